"""Which JAX primitives the tracer knows, and the error it raises for the others."""

from __future__ import annotations


class UnsupportedPrimitiveError(ValueError):
  """The traced function uses an operation qbound cannot bound."""


_CALL_PARAM_NAMES = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_COEFFICIENT_PRIMS = {"dot_general", "conv_general_dilated", "mul", "div"}
_ROUTING_PRIMS = {"reshape", "broadcast_in_dim", "squeeze", "expand_dims", "transpose", "reduce_sum",
                  "slice", "pad", "rev", "concatenate", "stack", "scatter", "dynamic_slice", "gather", "reduce_window_sum", "tile"}
_IDENTITY_PRIMS = {"copy", "copy_p", "optimization_barrier"}
_PRECISE_PRIMS = {"dot_general", "conv_general_dilated"}
SUPPORTED = sorted(_COEFFICIENT_PRIMS | _ROUTING_PRIMS | _IDENTITY_PRIMS |
                   {"add", "add_any", "sub", "neg", "max", "min", "clamp", "convert_element_type",
                    "round", "floor", "ceil", "tanh", "logistic", "abs", "select_n", "ge", "gt", "le", "lt",
                    "reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min",
                    "exp", "rsqrt", "sqrt", "erf", "erfc", "integer_pow", "square", "stop_gradient",
                    "jit", "pjit", "custom_jvp_call", "custom_vjp_call", "checkpoint", "closed_call"})
