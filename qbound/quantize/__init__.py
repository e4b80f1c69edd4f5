"""Quantization and compression of parameters as pure pytree transforms.

Every transform maps a parameter pytree (Flax linen variables, nnx state, any
pytree of arrays) to a new one of the same structure and dtypes whose values
lie on the scheme's grid. Factories (``uniform_quantizer(bits=4)``) return
``params -> params`` functions that compose with `chain`, `masked` and
`by_path`; the plain names (``uniform(params, bits=4)``) apply them once.

>>> import jax, jax.numpy as jnp
>>> from qbound import quantize as qz
>>> params = {'params': {'Dense_0': {'kernel': jnp.array([[0.6, -1.5]]), 'bias': jnp.array([0.1, 0.0])}}}
>>> compress = qz.chain(qz.pruner(0.5), qz.uniform_quantizer(bits=3, where=qz.kernels_only))
>>> compress(params)['params']['Dense_0']['kernel'].tolist()
[[0.0, -1.5]]
"""

from qbound.quantize.coding import LayerSize as LayerSize
from qbound.quantize.coding import SizeReport as SizeReport
from qbound.quantize.coding import huffman_bits as huffman_bits
from qbound.quantize.coding import huffman_code_lengths as huffman_code_lengths
from qbound.quantize.coding import size_report as size_report
from qbound.quantize.compress import low_rank as low_rank
from qbound.quantize.compress import low_rank_approximator as low_rank_approximator
from qbound.quantize.compress import prune as prune
from qbound.quantize.compress import pruner as pruner
from qbound.quantize.compress import share_weights as share_weights
from qbound.quantize.compress import weight_sharer as weight_sharer
from qbound.quantize.numerics import FLOAT_FORMATS as FLOAT_FORMATS
from qbound.quantize.numerics import ROUNDING_MODES as ROUNDING_MODES
from qbound.quantize.numerics import cast_float as cast_float
from qbound.quantize.numerics import int_range as int_range
from qbound.quantize.numerics import quantize_fixed_point as quantize_fixed_point
from qbound.quantize.numerics import quantize_int as quantize_int
from qbound.quantize.numerics import quantize_power_of_two as quantize_power_of_two
from qbound.quantize.numerics import round_to_int as round_to_int
from qbound.quantize.policy import Path as Path
from qbound.quantize.policy import Transform as Transform
from qbound.quantize.policy import biases_only as biases_only
from qbound.quantize.policy import by_path as by_path
from qbound.quantize.policy import chain as chain
from qbound.quantize.policy import kernels_only as kernels_only
from qbound.quantize.policy import map_selected as map_selected
from qbound.quantize.policy import masked as masked
from qbound.quantize.policy import path_matches as path_matches
from qbound.quantize.policy import path_of as path_of
from qbound.quantize.policy import path_str as path_str
from qbound.quantize.ternary import binary as binary
from qbound.quantize.ternary import binary_quantizer as binary_quantizer
from qbound.quantize.ternary import init_ttq_scales as init_ttq_scales
from qbound.quantize.ternary import ternary as ternary
from qbound.quantize.ternary import ternary_quantizer as ternary_quantizer
from qbound.quantize.ternary import trained_ternary as trained_ternary
from qbound.quantize.ternary import trained_ternary_quantizer as trained_ternary_quantizer
from qbound.quantize.weights import FixedPointFormat as FixedPointFormat
from qbound.quantize.weights import fixed_point as fixed_point
from qbound.quantize.weights import fixed_point_formats as fixed_point_formats
from qbound.quantize.weights import fixed_point_quantizer as fixed_point_quantizer
from qbound.quantize.weights import float_format as float_format
from qbound.quantize.weights import float_quantizer as float_quantizer
from qbound.quantize.weights import power_of_two as power_of_two
from qbound.quantize.weights import power_of_two_quantizer as power_of_two_quantizer
from qbound.quantize.weights import uniform as uniform
from qbound.quantize.weights import uniform_quantizer as uniform_quantizer
from qbound.quantize.activations import ActivationRange as ActivationRange
from qbound.quantize.activations import DQALayer as DQALayer
from qbound.quantize.activations import DQAReport as DQAReport
from qbound.quantize.activations import activation_grid as activation_grid
from qbound.quantize.activations import calibrate as calibrate
from qbound.quantize.activations import dqa as dqa
from qbound.quantize.activations import fake_quant as fake_quant
from qbound.quantize.activations import quantize_activations as quantize_activations
from qbound.quantize.activations import shift_split as shift_split
from qbound.quantize.qat import retrain as retrain
from qbound.quantize.qat import retrain_ttq as retrain_ttq
from qbound.quantize.qat import straight_through as straight_through
