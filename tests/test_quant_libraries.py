"""Models quantized by the JAX quantization libraries users reach for: qwix and AQT (``aqtp``).

Both are optional extras (``pip install 'qbound[qwix,aqt]'``, and in ``test``); the tests skip, saying
so, where a library is missing. What is checked: qbound traces what each library produces, its
certificates hold against float64 sampling, weight-only quantization keeps the differential pairing
where the library dequantizes the weights (qwix), and what stays unsupported (activations quantized
with scales computed from each input) is refused naming the library's source line.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb
import helpers as H

flax_linen = pytest.importorskip("flax.linen")

INPUTS = 4


class _MLP(flax_linen.Module):
  """4-16-16-2 with biases; ``dot_general_cls`` lets AQT replace the products."""
  dot_general_cls: object = None

  @flax_linen.compact
  def __call__(self, x):
    extra = {} if self.dot_general_cls is None else {"dot_general_cls": self.dot_general_cls}
    for width in (16, 16):
      x = flax_linen.relu(flax_linen.Dense(width, **extra)(x))
    return flax_linen.Dense(2, **extra)(x)


@pytest.fixture(scope="module")
def original():
  model = _MLP()
  params = model.init(jax.random.key(3), jnp.zeros(INPUTS))
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape), params)  # biases != 0
  return model, params


def _box():
  return qb.Box(-jnp.ones(INPUTS), jnp.ones(INPUTS))


def _check_sound(f, fq, cert):
  merged = qb.merge(f, fq, _box())
  values = H.eval64(merged, H.sample_points(_box(), 2000))
  assert np.all(values >= cert.diff_lower) and np.all(values <= cert.diff_upper)
  assert np.max(np.abs(values)) <= cert.upper
  assert cert.lower <= cert.upper
  return merged


def _qwix_ptq(model, params, qtype):
  qwix = pytest.importorskip("qwix", reason="qwix is not installed (pip install 'qbound[qwix]')")
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype)]
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), jnp.zeros(INPUTS))
  qparams = qwix.quantize_params(params["params"], abstract["params"])
  return lambda x: qmodel.apply({"params": qparams}, x)


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_qwix_weight_quantization_is_paired_and_sound(original, qtype):
  model, params = original
  f = functools.partial(model.apply, params)
  fq = _qwix_ptq(model, params, qtype)
  cert = qb.certify(f, fq, _box(), time_budget=20, target_gap=0.1)
  merged = _check_sound(f, fq, cert)
  assert merged.paired  # qwix dequantizes the kernels: the layers line up with f's
  assert cert.lower > 0 and cert.upper <= 2 * cert.lower


def test_qwix_nnx_weight_quantization_is_paired_and_sound():
  qwix = pytest.importorskip("qwix", reason="qwix is not installed (pip install 'qbound[qwix]')")
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(INPUTS, 16, rngs=rngs)
      self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.relu(self.hidden(x)))

  model = MLP(nnx.Rngs(0))
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8")]
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules), jnp.zeros(INPUTS))
  graphdef, state = nnx.split(model)
  q_graphdef, q_state = nnx.split(qmodel)
  f = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731
  fq = lambda x: nnx.merge(q_graphdef, q_state)(x)  # noqa: E731
  cert = qb.certify(f, fq, _box(), time_budget=20, target_gap=0.1)
  assert _check_sound(f, fq, cert).paired
  assert cert.lower > 0 and cert.upper <= 2 * cert.lower


def test_qwix_dynamic_activation_quantization_is_refused_clearly(original):
  qwix = pytest.importorskip("qwix", reason="qwix is not installed (pip install 'qbound[qwix]')")
  model, params = original
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), jnp.zeros(INPUTS))
  qparams = qwix.quantize_params(params["params"], abstract["params"])
  fq = lambda x: qmodel.apply({"params": qparams}, x)  # noqa: E731
  with pytest.raises(qb.UnsupportedPrimitiveError) as err:
    qb.merge(functools.partial(model.apply, params), fq, _box())
  assert "qwix" in str(err.value)  # names the library's line that computes the scale


def test_aqt_weight_quantization_is_sound(original):
  pytest.importorskip("aqt.jax.v2.flax.aqt_flax", reason="AQT is not installed (pip install 'qbound[aqt]')")
  from aqt.jax.v2 import config as aqt_config
  from aqt.jax.v2.flax import aqt_flax

  model, params = original
  config = aqt_config.dot_general_make(lhs_bits=None, rhs_bits=8)  # int8 weights, float activations
  qmodel = _MLP(dot_general_cls=lambda: aqt_flax.AqtDotGeneral(config))
  fq = lambda x: qmodel.apply(params, x, rngs={"params": jax.random.key(0)})  # noqa: E731
  f = functools.partial(model.apply, params)
  assert np.max(np.abs(np.asarray(f(jnp.full(INPUTS, 0.3)) - fq(jnp.full(INPUTS, 0.3))))) > 0
  cert = qb.certify(f, fq, _box(), time_budget=5, target_gap=0.1)
  _check_sound(f, fq, cert)
  assert cert.lower > 0 and np.isfinite(cert.upper)
