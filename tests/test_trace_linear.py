"""The term counts of linear operations, read off their shapes, against counting on all-ones data.

The counts size the rounding margins of sound mode: a count below the true one would make a margin
too small (an unsound bound), so every shape rule is checked against the count it replaces.
"""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbound.trace import linear
from qbound.trace.primitives import _COEFFICIENT_PRIMS


def _both(fn, in_shape, *consts, var_pos=0):
  """``(terms, terms_transpose)`` from the shape rules and from counting on ones, for ``fn`` made
  of one primitive with the input at operand ``var_pos``, built as the tracer builds it."""
  args = list(consts)
  args.insert(var_pos, jnp.zeros(in_shape, jnp.float32))
  (eqn,) = jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr.eqns
  op = linear.LinearOp(name=eqn.primitive.name, primitive=eqn.primitive, params=linear._freeze(dict(eqn.params)),
                       var_pos=var_pos, in_shape=tuple(in_shape), out_shape=tuple(eqn.outvars[0].aval.shape),
                       dtype="float32", coefficients=eqn.primitive.name in _COEFFICIENT_PRIMS)
  ruled = linear._with_term_counts(op, consts)
  saved = linear._counted
  linear._counted = lambda *_: None
  try:
    counted = linear._with_term_counts(op, consts)
  finally:
    linear._counted = saved
  return (ruled.terms, ruled.terms_transpose), (counted.terms, counted.terms_transpose)


@settings(deadline=None)  # (the profile's examples: 15 by default, 300 with HYPOTHESIS_PROFILE=thorough)
@given(spatial=st.integers(1, 2), data=st.data())
def test_convolution_counts_equal_counting_on_ones(spatial, data):
  ints = lambda lo, hi: st.lists(st.integers(lo, hi), min_size=spatial, max_size=spatial)  # noqa: E731
  kernel, strides, dilation = data.draw(ints(1, 4)), data.draw(ints(1, 3)), data.draw(ints(1, 3))
  size = data.draw(ints(1, 9))
  groups = data.draw(st.sampled_from([1, 2]))
  c_in, c_out = groups * data.draw(st.integers(1, 3)), groups * data.draw(st.integers(1, 3))
  padding = data.draw(st.sampled_from(["SAME", "VALID", "explicit"]))
  if padding == "explicit":
    padding = [tuple(data.draw(st.lists(st.integers(-1, 3), min_size=2, max_size=2))) for _ in range(spatial)]
  channels_last = data.draw(st.booleans())
  letters = "HW"[:spatial] if spatial == 2 else "W"
  numbers = (f"N{letters}C", f"{letters}IO", f"N{letters}C") if channels_last else (f"NC{letters}", f"OI{letters}", f"NC{letters}")
  in_shape = (1, *size, c_in) if channels_last else (1, c_in, *size)
  w_shape = (*kernel, c_in // groups, c_out) if channels_last else (c_out, c_in // groups, *kernel)

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=numbers,
                                        feature_group_count=groups)

  try:
    jax.eval_shape(conv, jnp.zeros(in_shape), jnp.zeros(w_shape))
  except (TypeError, ValueError):
    return  # the window does not fit the input: no such layer
  ruled, counted = _both(conv, in_shape, jnp.full(w_shape, 0.5))
  assert ruled == counted


_MATMUL = (((1,), (0,)), ((), ()))
_BATCHED = (((2,), (1,)), ((0,), (0,)))


@pytest.mark.parametrize("fn, in_shape, const_shape, var_pos", [
    (lambda x, w: jax.lax.dot_general(x, w, (((0,), (0,)), ((), ()))), (5,), (5, 3), 0),
    (lambda x, w: jax.lax.dot_general(x, w, _MATMUL), (2, 5), (5, 3), 0),
    (lambda w, x: jax.lax.dot_general(w, x, _MATMUL), (5, 4), (3, 5), 1),
    (lambda x, w: jax.lax.dot_general(x, w, _BATCHED), (2, 3, 4), (2, 4, 6), 0),
    (lambda w, x: jax.lax.dot_general(w, x, _BATCHED), (2, 4, 6), (2, 3, 4), 1),
    (lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))), (3, 7), (2, 7), 0),
    (lambda x, w: jax.lax.dot_general(x, w, (((0, 1), (1, 2)), ((), ()))), (3, 7), (4, 3, 7), 0),
    (jax.lax.mul, (3, 4), (3, 4), 0),
    (jax.lax.mul, (3, 4), (3, 4), 1),
    (jax.lax.div, (3, 4), (3, 4), 0),
])
def test_product_counts_equal_counting_on_ones(fn, in_shape, const_shape, var_pos):
  ruled, counted = _both(fn, in_shape, jnp.full(const_shape, 0.5), var_pos=var_pos)
  assert ruled == counted


@pytest.mark.parametrize("fn, in_shape", [
    (lambda x: jnp.broadcast_to(x, (4, 3)), (3,)),
    (lambda x: jnp.broadcast_to(x, (2, 4, 3)), (1, 3)),
    (lambda x: x.reshape(6), (2, 3)),
    (lambda x: x.T, (2, 3)),
    (lambda x: jax.lax.slice(x, (1,), (3,)), (5,)),
    (lambda x: jax.lax.slice(x, (0, 1), (2, 4), (1, 2)), (3, 5)),
    (lambda x: jax.lax.rev(x, (0,)), (5,)),
    (lambda x: jax.lax.expand_dims(x, (1,)), (4,)),
    (lambda x: jax.lax.squeeze(x, (0,)), (1, 4)),
])
def test_routing_counts_equal_counting_on_ones(fn, in_shape):
  ruled, counted = _both(fn, in_shape)
  assert ruled == counted
