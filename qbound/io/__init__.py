"""Model readers and writers: files in, ``(apply, params)`` out.

Every loader returns ``apply(params, x)``, a pure JAX function of ONE unbatched input, and params,
a Flax-style nested dict of float32 arrays whose weights sit under ``params['params']`` in the
``flax.linen`` layout (``kernel`` with the output channel last, ``bias``). Constants the forward
pass needs but that are not weights (input normalisation, batch-norm statistics, other constants)
sit under other top-level keys: quantize ``params['params']`` only.
"""

from qbound.io.bundled import bundled_path as bundled_path
from qbound.io.nnet import load_nnet as load_nnet
from qbound.io.nnet import read_nnet_header as read_nnet_header
from qbound.io.nnet import save_nnet as save_nnet
from qbound.io.onnx_reader import load_onnx as load_onnx

__all__ = ["bundled_path", "load_nnet", "load_onnx", "read_nnet_header", "save_nnet"]
