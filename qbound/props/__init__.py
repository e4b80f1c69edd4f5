"""Properties of a network and its compressed copy, decided with a proof or a counterexample.

``qb.certify`` bounds the maximal error; :func:`verify` answers the questions users of compression
ask first: does the compressed model still predict the same class (:class:`Top1`), wherever the
original is confident (:class:`DeltaTop1`), is its error below a threshold (:class:`MaxError`, with
per-output weights) or small relative to the output (:class:`RelativeError`), or does it avoid an
unsafe output region stated in VNN-LIB (:class:`Unsafe`).
"""

from qbound.props.agreement import Agreement, certified_agreement
from qbound.props.spec import DeltaTop1, MaxError, Polytope, RelativeError, Top1, Unsafe
from qbound.props.verify import Verdict, verify

__all__ = ["Agreement", "DeltaTop1", "MaxError", "Polytope", "RelativeError", "Top1", "Unsafe", "Verdict",
           "certified_agreement", "verify"]
