"""Model readers and writers: files in, ``(apply, params)`` out; networks and properties out.

Every loader returns ``apply(params, x)``, a pure JAX function of ONE unbatched input, and params,
a Flax-style nested dict of float32 arrays whose weights sit under ``params['params']`` in the
``flax.linen`` layout (``kernel`` with the output channel last, ``bias``). Constants the forward
pass needs but that are not weights (input normalisation, batch-norm statistics, other constants)
sit under other top-level keys: quantize ``params['params']`` only.

The writers hand qbound's networks to other tools: ``export_onnx`` writes a graph (above all the
merged difference network ``f - f_q``) as ONNX, ``export_vnnlib`` the property "max error <=
epsilon over the box" as VNN-LIB, and ``export_property`` both, for VNN-COMP verifiers.
``load_vnnlib`` reads VNN-LIB 1.0 and 2.0 problems back: input boxes and unsafe output polytopes
(it needs the ``vnnlib`` package: ``pip install 'qbound[vnnlib]'``).
"""

from qbound.errors import VnnlibError as VnnlibError
from qbound.io.bundled import bundled_path as bundled_path
from qbound.io.nnet import load_nnet as load_nnet
from qbound.io.nnet import read_nnet_header as read_nnet_header
from qbound.io.nnet import save_nnet as save_nnet
from qbound.io.onnx_export import UnsupportedNodeError as UnsupportedNodeError
from qbound.io.onnx_export import export_onnx as export_onnx
from qbound.io.onnx_reader import load_onnx as load_onnx
from qbound.io.vnnlib import export_property as export_property
from qbound.io.vnnlib import export_vnnlib as export_vnnlib
from qbound.io.vnnlib_reader import Polytope as Polytope
from qbound.io.vnnlib_reader import VnnlibCase as VnnlibCase
from qbound.io.vnnlib_reader import VnnlibNetwork as VnnlibNetwork
from qbound.io.vnnlib_reader import VnnlibProblem as VnnlibProblem
from qbound.io.vnnlib_reader import load_vnnlib as load_vnnlib
from qbound.io.vnnlib_reader import parse_vnnlib as parse_vnnlib

__all__ = ["Polytope", "UnsupportedNodeError", "VnnlibCase", "VnnlibError", "VnnlibNetwork", "VnnlibProblem",
           "bundled_path", "export_onnx", "export_property", "export_vnnlib", "load_nnet", "load_onnx",
           "load_vnnlib", "parse_vnnlib", "read_nnet_header", "save_nnet"]
