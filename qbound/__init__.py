"""qbound: formal bounds on the error of quantized and compressed neural networks, in JAX.

The one call most users make is :func:`certify`; the pieces it is built from are re-exported here.
"""

from qbound import _xla_flags

_xla_flags.apply()  # before anything creates JAX's CPU backend

from qbound import _compilation_cache  # noqa: E402

_compilation_cache.apply()  # compiled steps kept across processes (QBOUND_JAX_CACHE=0 turns it off)

from qbound import bounds  # noqa: E402  (the flags above must come first)
from qbound import compression
from qbound import exact
from qbound import io
from qbound import memory
from qbound import models
from qbound import props
from qbound import quantize
from qbound import sharding
from qbound.attack import Search, maximize_error
from qbound.batch import BatchCertificate, certify_batch
from qbound.box import Box, linf_ball
from qbound.certify import Certificate, certify
from qbound.errors import BoundOverflowError, FloatTieWarning, InfiniteBoundWarning, InvalidBoundsError, SoundnessError, VnnlibError
from qbound.graph import Graph, Node
from qbound.merge import MergedNetwork, merge
from qbound.trace import UnsupportedPrimitiveError, trace

__version__ = "0.1.0"  # the one place: pyproject.toml reads it; CITATION.cff repeats it (tests/test_packaging.py)

__all__ = [
    "BatchCertificate",
    "BoundOverflowError",
    "Box",
    "Certificate",
    "Graph",
    "FloatTieWarning",
    "InfiniteBoundWarning",
    "InvalidBoundsError",
    "MergedNetwork",
    "Node",
    "Search",
    "SoundnessError",
    "UnsupportedPrimitiveError",
    "VnnlibError",
    "bounds",
    "certify",
    "certify_batch",
    "compression",
    "exact",
    "io",
    "linf_ball",
    "maximize_error",
    "memory",
    "merge",
    "models",
    "props",
    "quantize",
    "sharding",
    "trace",
]
