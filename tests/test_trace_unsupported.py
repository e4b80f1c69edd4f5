"""Tests of qbound.trace.unsupported: refusals name the user's operation and line, not JAX's primitive.

``jax.nn.log_softmax`` used to be refused as ``stop_gradient`` and ``jax.nn.elu`` as ``expm1``,
with a line inside JAX. The message now names the function the user called, the line they called it
from and, for common ones, what to do instead. (Softmax, GELU, SiLU and layer norm are bounded
since products and smooth curves became nodes; tests/test_nonlinear.py.)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import qbound as qb
from qbound.trace import unsupported

W = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


@pytest.mark.parametrize("fn, operation, primitive", [
    (jax.nn.log_softmax, "jax.nn.log_softmax", "log"),
    (jax.nn.elu, "jax.nn.elu", "expm1"),
    (jax.nn.celu, "jax.nn.celu", "expm1"),
    (jax.nn.softplus, "jax.nn.softplus", None),
    (jax.nn.mish, "jax.nn.mish", None),
], ids=["log_softmax", "elu", "celu", "softplus", "mish"])
@pytest.mark.parametrize("weights", ["float", "quantized inside"])
def test_library_functions_are_named_with_the_users_line(fn, operation, primitive, weights):
  # "quantized inside": a constant part large enough to be folded as one program (trace.fold),
  # whose partial evaluation inlines custom_jvp calls: the message still names the function.
  def weight():  # (called inside the traced function: its operations are the jaxpr's)
    if weights == "float":
      return W
    scale = jnp.max(jnp.abs(W)) / 127
    return jnp.round(jnp.clip(W / scale, -127, 127)) * scale + jnp.floor(W * 0) + jnp.ceil(W * 0)

  with pytest.raises(qb.UnsupportedPrimitiveError) as err:
    qb.trace(lambda x: fn(x @ weight()), jnp.zeros(4))  # the user's line: this one
  message = str(err.value)
  assert message.startswith(f"qbound cannot bound {operation}, called at "), message
  assert "test_trace_unsupported.py:" in message and "/jax/_src/" not in message.split("Supported")[0]
  if primitive is not None:
    assert f"primitive '{primitive}'" in message
  assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("fn", [jax.nn.softmax, jax.nn.gelu, lambda h: jax.nn.gelu(h, approximate=False), jax.nn.silu,
                                jax.nn.standardize, lambda h: h / jnp.linalg.norm(h)],
                         ids=["softmax", "gelu", "gelu-exact", "silu", "standardize", "norm"])
def test_functions_refused_before_are_traced(fn):
  qb.trace(lambda x: fn(x @ W), jnp.zeros(4))


def test_log_softmax_hint_says_to_certify_the_logits():
  with pytest.raises(qb.UnsupportedPrimitiveError, match="certify the logits"):
    qb.trace(lambda x: jax.nn.log_softmax(x @ W), jnp.zeros(4))


def test_elu_hint_lists_the_activations_that_work():
  with pytest.raises(qb.UnsupportedPrimitiveError, match="qbound bounds ReLU, leaky ReLU.*GELU"):
    qb.trace(lambda x: jax.nn.elu(x @ W), jnp.zeros(4))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.elu(nn.Dense(4)(x))  # line of the elu call


class _Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(_Block()(x)))


def test_linen_module_names_the_function_and_the_modules_line():
  model = _Model()
  params = model.init(jax.random.key(0), jnp.zeros(3))
  with pytest.raises(qb.UnsupportedPrimitiveError) as err:
    qb.trace(lambda x: model.apply(params, x), jnp.zeros(3))
  message = str(err.value)
  assert message.startswith("qbound cannot bound jax.nn.elu, called at ")
  assert "test_trace_unsupported.py" in message and "(_Block.__call__)" in message
  assert "qbound bounds ReLU" in message  # what works instead


def test_linen_and_nnx_layer_norm_are_traced():
  model = nn.LayerNorm()
  params = model.init(jax.random.key(0), jnp.zeros(3))
  qb.trace(lambda x: model.apply(params, x), jnp.zeros(3))


def test_nnx_layer_norm_and_sequential_elu():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.lin(x))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  qb.trace(lambda x: nnx.merge(graphdef, state)(x), jnp.zeros(3))  # nnx layer norm is bounded
  seq = nn.Sequential([nn.Dense(3), nn.elu])
  params = seq.init(jax.random.key(0), jnp.zeros(3))
  # Containers are not the operation: the gelu inside is.
  with pytest.raises(qb.UnsupportedPrimitiveError, match=r"^qbound cannot bound jax.nn.elu"):
    qb.trace(lambda x: seq.apply(params, x), jnp.zeros(3))


def test_jitted_helper_is_named_even_from_the_compilation_cache():
  @jax.jit
  def head(h):
    return jax.nn.log_softmax(h)

  for fn in (lambda x: head(x @ W), lambda x: head(x @ W + 1.0)):  # the second reuses the traced jaxpr
    with pytest.raises(qb.UnsupportedPrimitiveError, match=r"^qbound cannot bound jax.nn.log_softmax, called at .*head\)"):
      qb.trace(fn, jnp.zeros(4))


def test_users_own_primitives_keep_the_plain_message():
  with pytest.raises(qb.UnsupportedPrimitiveError, match=r"^qbound cannot bound the primitive 'sin' used at "
                                                          r".*test_trace_unsupported\.py:\d+"):
    qb.trace(lambda x: jnp.sin(x @ W), jnp.zeros(4))
  with pytest.raises(qb.UnsupportedPrimitiveError, match=r"^qbound cannot bound the primitive 'tan' used at "):
    qb.trace(lambda x: jnp.tan(x @ W), jnp.zeros(4))


def test_certify_refuses_log_softmax_models_by_name():
  model = nn.Sequential([nn.Dense(3), jax.nn.log_softmax])
  params = model.init(jax.random.key(0), jnp.zeros(4))
  box = qb.Box(-jnp.ones(4), jnp.ones(4))
  with pytest.raises(qb.UnsupportedPrimitiveError, match="jax.nn.log_softmax"):
    qb.certify(lambda x: model.apply(params, x), lambda x: model.apply(params, x), box, method="interval")


def test_frames_without_a_user_line_give_no_name():
  class Frame:
    def __init__(self, file_name, function_name):
      self.file_name, self.function_name, self.line_num = file_name, function_name, 1

  assert unsupported._public_name(Frame("/x/site-packages/jax/_src/nn/functions.py", "gelu")) == "jax.nn.gelu"
  assert unsupported._public_name(Frame("/x/site-packages/flax/linen/normalization.py", "LayerNorm.__call__")) == \
      "flax.linen.LayerNorm"
  assert unsupported._public_name(Frame("/x/site-packages/jax/_src/numpy/array_methods.py", "_operator_mul")) is None
  assert unsupported._public_name(Frame("/home/me/model.py", "f")) is None
