"""Models quantized by the JAX quantization libraries users reach for: qwix and AQT (``aqtp``).

Both are optional extras (``pip install 'qbound[qwix,aqt]'``, and in ``test``); the tests skip, saying
so, where a library is missing. What is checked: qbound traces what each library produces, its
certificates hold against float64 sampling of the merged network and float32 sampling of the
library's own functions, the layers pair with the float model's (the differential bounds) where the
library dequantizes the weights (qwix) and where it rescales after an integer product (AQT, qwix's
static activation scales: :mod:`qbound.trace.scaled`). Activations quantized with scales computed
from each input (qwix's per-tensor and per-token absmax, asymmetric minmax with zero points, AQT's
dynamic calibration, qwix's ``rms`` calibration whose largest entries saturate) are certified
soundly against an independent search on the library's own function.
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


def _check_sound(f, fq, cert, box=None):
  box = _box() if box is None else box
  merged = qb.merge(f, fq, box)
  points = H.sample_points(box, 2000)
  values = H.eval64(merged, points).reshape(len(points), -1)  # the bounds are flat
  assert np.all(values >= cert.diff_lower) and np.all(values <= cert.diff_upper)
  assert np.max(np.abs(values)) <= cert.upper
  assert cert.lower <= cert.upper
  # The library's own functions, as they compute in float32 (rounding may move a value across a
  # quantization step, so this is the reached error, which the proven bound must exceed too).
  # The bound is for real arithmetic: float32 may exceed it by its own rounding of the outputs.
  xs = jnp.asarray(points, jnp.float32)
  fx, fqx = np.asarray(jax.vmap(f)(xs)), np.asarray(jax.vmap(fq)(xs))
  rounding = 1e-5 * (np.max(np.abs(fx)) + np.max(np.abs(fqx)))
  assert np.max(np.abs(fx - fqx)) <= cert.upper + rounding
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
  cert = qb.certify(f, fq, _box(), time_budget=60, target_gap=0.1)  # stops at 10%; 60 s for compiling
  merged = _check_sound(f, fq, cert)
  assert merged.paired  # qwix dequantizes the kernels: the layers line up with f's
  assert cert.lower > 0 and cert.upper <= 2 * cert.lower


def _nnx_mlp():
  """An nnx MLP with INPUTS inputs, 16 ReLUs and 2 outputs."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(INPUTS, 16, rngs=rngs)
      self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.relu(self.hidden(x)))

  return MLP(nnx.Rngs(0))


def test_qwix_nnx_weight_quantization_is_paired_and_sound():
  qwix = pytest.importorskip("qwix", reason="qwix is not installed (pip install 'qbound[qwix]')")
  from flax import nnx

  model = _nnx_mlp()
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8")]
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules), jnp.zeros(INPUTS))
  graphdef, state = nnx.split(model)
  q_graphdef, q_state = nnx.split(qmodel)
  f = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731
  fq = lambda x: nnx.merge(q_graphdef, q_state)(x)  # noqa: E731
  cert = qb.certify(f, fq, _box(), time_budget=60, target_gap=0.1)  # stops at 10%; 60 s for compiling
  assert _check_sound(f, fq, cert).paired
  assert cert.lower > 0 and cert.upper <= 2 * cert.lower


def _dynamic_rules(weight_qtype="int8", **extra):
  """qwix rules quantizing weights and activations, the activations' scales computed from each
  input at run time (no ``act_static_scale``): what qwix PTQ and QT models run."""
  qwix = pytest.importorskip("qwix", reason="qwix is not installed (pip install 'qbound[qwix]')")
  return qwix, [qwix.QuantizationRule(module_path=".*", weight_qtype=weight_qtype, act_qtype="int8", **extra)]


def _qwix_dynamic_ptq(model, params, x0, **rule):
  """qwix PTQ of ``model`` with :func:`_dynamic_rules` (``x0``: an input of the model's shape)."""
  qwix, rules = _dynamic_rules(**rule)
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), x0)
  qparams = qwix.quantize_params(params["params"], abstract["params"])
  return lambda x: qmodel.apply({"params": qparams}, x)


def _check_dynamic(f, fq, box=None, ratio=None, **kwargs):
  """Certifies f against qwix's dynamically quantized fq: paired, sound, and within ``ratio``."""
  box = _box() if box is None else box
  cert = qb.certify(f, fq, box, **kwargs)
  merged = _check_sound(f, fq, cert, box)
  assert merged.paired  # the dynamic rounding node stands beside f's identity; the products pair
  assert any(n.kind == "round" and n.attrs[0] == "dynamic" for n in merged.fq_graph.nodes)
  # An independent reached error: sampling and a local search on the library's own function (jit,
  # as users run it), which the proven bound must exceed.
  err = jax.jit(jax.vmap(lambda x: jnp.max(jnp.abs(f(x) - fq(x)))))
  xs = jnp.asarray(H.sample_points(box, 4000, seed=7), jnp.float32)
  for r in (0.2, 0.05, 0.01):
    best = xs[jnp.argsort(-err(xs))[:40]]
    noise = jax.random.uniform(jax.random.key(int(1000 * r)), (40, 50, *box.shape), minval=-r, maxval=r)
    span = (box.upper - box.lower)
    xs = jnp.clip((best[:, None] + noise * span).reshape(-1, *box.shape), box.lower, box.upper)
  reached = float(jnp.max(err(xs)))
  assert reached <= cert.upper * (1 + 1e-5)
  assert 0 < cert.lower <= cert.upper
  if ratio is not None:
    assert cert.upper <= ratio * max(cert.lower, reached)
  return cert


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_qwix_dynamic_activation_scales_are_paired_and_sound(original, qtype):
  model, params = original
  fq = _qwix_dynamic_ptq(model, params, jnp.zeros(INPUTS), weight_qtype=qtype)
  _check_dynamic(functools.partial(model.apply, params), fq, method="diff")


@pytest.mark.slow  # ~25 s on 2 loaded cores, mostly compiling
def test_qwix_qt_provider_forward_is_sound(original):
  """A qwix QT (quantization-aware training) model evaluated as it runs: fake-quantized weights
  and activations, the activations' scales from each input; ``absmax,0.9`` clips the largest."""
  qwix, rules = _dynamic_rules(act_calibration_method="absmax,0.9")
  model, params = original
  qat = qwix.quantize_model(model, qwix.QtProvider(rules))
  # Batched as users run it (unbatched, qwix's QT provider takes a (16,) activation for the next
  # layer's (16,) bias, by shape, and refuses it as a second weight).
  fq = lambda x: qat.apply(params, x[None])[0]  # noqa: E731
  f = lambda x: model.apply(params, x[None])[0]  # noqa: E731
  _check_dynamic(f, fq, method="diff")


@pytest.mark.slow  # ~40 s: compiling the branch and bound, then 30 s of it
def test_qwix_dynamic_nnx_branch_and_bound_is_tight():
  qwix, rules = _dynamic_rules()
  from flax import nnx

  model = _nnx_mlp()
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules), jnp.zeros(INPUTS))
  graphdef, state = nnx.split(model)
  q_graphdef, q_state = nnx.split(qmodel)
  f = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731
  fq = lambda x: nnx.merge(q_graphdef, q_state)(x)  # noqa: E731
  # Branch and bound: pieces on which x / s stays on one rounding step bound q(x) = k s(x) exactly.
  _check_dynamic(f, fq, method="bab", time_budget=30, target_gap=0.3, ratio=2.5)


class _SmallCNN(flax_linen.Module):
  """A 3x3 stride-2 convolution of one 6x6 image, ReLU, dense 2 (qwix quantizes convolutions only with
  their activations)."""

  @flax_linen.compact
  def __call__(self, x):
    x = flax_linen.relu(flax_linen.Conv(3, (3, 3), strides=2)(x[None, :, :, None]))
    return flax_linen.Dense(2)(x.reshape((1, -1)))[0]


@pytest.mark.slow  # ~30 s on 2 loaded cores, mostly compiling the differential bound for a conv
def test_qwix_dynamic_cnn_is_paired_and_sound():
  model = _SmallCNN()
  params = model.init(jax.random.key(0), jnp.zeros((6, 6)))
  fq = _qwix_dynamic_ptq(model, params, jnp.zeros((6, 6)))
  box = qb.Box(jnp.full((6, 6), 0.4), jnp.full((6, 6), 0.6))
  cert = _check_dynamic(functools.partial(model.apply, params), fq, box, method="diff")
  assert cert.upper < 1.0


@pytest.mark.slow  # ~14 s; per-group bounds are tested on hand-written patterns in test_trace_dynamic
def test_qwix_dynamic_per_token_scales_are_paired_and_sound(original):
  """A batch of 3 tokens: qwix computes one scale per token (its channelwise axes are the product's
  free axes); each token's rounding node is bounded from that token's bounds."""
  model, params = original
  box = qb.Box(-jnp.ones((3, INPUTS)), jnp.ones((3, INPUTS)).at[1].set(0.1))
  fq = _qwix_dynamic_ptq(model, params, box.lower)
  cert = _check_dynamic(functools.partial(model.apply, params), fq, box, method="diff")
  merged = qb.merge(functools.partial(model.apply, params), fq, box)
  assert {n.attrs[1].axes for n in merged.fq_graph.nodes if n.kind == "round"} == {(-1,)}
  # the second token's box is narrower, its scale smaller: its error bound is tighter
  per_token = np.maximum(np.abs(cert.diff_lower), np.abs(cert.diff_upper)).reshape(3, -1).max(axis=1)
  assert per_token[1] < per_token[0]


# QT's forward runs the same integer product as PTQ: slow (~30 s on 2 loaded cores, mostly compiling)
@pytest.mark.parametrize("provider", ["ptq", pytest.param("qt", marks=pytest.mark.slow)])
def test_qwix_dynamic_minmax_zero_points_are_paired_and_sound(original, provider):
  """Asymmetric scales (``minmax``): s = (max(max x, 0) - min(min x, 0)) / 255, an int8 zero point,
  and qwix's product (c @ W - z @ W) * s."""
  model, params = original
  if provider == "ptq":
    fq = _qwix_dynamic_ptq(model, params, jnp.zeros(INPUTS), act_calibration_method="minmax")
    f = functools.partial(model.apply, params)
  else:
    qwix, rules = _dynamic_rules(act_calibration_method="minmax")
    qat = qwix.quantize_model(model, qwix.QtProvider(rules))
    fq = lambda x: qat.apply(params, x[None])[0]  # noqa: E731
    f = lambda x: model.apply(params, x[None])[0]  # noqa: E731
  merged = qb.merge(f, fq, _box())
  assert all(n.attrs[1].zero_point == (-128.0, 255.0) for n in merged.fq_graph.nodes if n.kind == "round")
  _check_dynamic(f, fq, method="diff")


@pytest.mark.slow  # ~13 s, mostly compiling the convolution; the minmax PTQ test covers the zero points
def test_qwix_dynamic_minmax_before_a_convolution_is_sound():
  """qwix subtracts the zero point's convolution, conv(c, W) - conv(z, W): one node, paired."""
  model = _SmallCNN()
  params = model.init(jax.random.key(0), jnp.zeros((6, 6)))
  fq = _qwix_dynamic_ptq(model, params, jnp.zeros((6, 6)), act_calibration_method="minmax")
  box = qb.Box(jnp.full((6, 6), -0.5), jnp.full((6, 6), 0.6))
  _check_dynamic(functools.partial(model.apply, params), fq, box, method="interval")


@pytest.mark.parametrize("provider,sound", [("ptq", True), pytest.param("ptq", False, marks=pytest.mark.slow),
                                           pytest.param("qt", True, marks=pytest.mark.slow)])
def test_qwix_dynamic_rms_calibration_is_paired_and_sound(original, provider, sound):
  """``rms,c`` calibration: s = c sqrt(mean(x^2)) / 127.5; entries beyond 127.5 s saturate, and the
  band takes in the worst of it (qbound.rms_rounding). In both float modes (float32's is slow here,
  ~14 s at load 6; test_trace_dynamic's rms pattern covers it cheaply)."""
  model, params = original
  if provider == "ptq":
    fq = _qwix_dynamic_ptq(model, params, jnp.zeros(INPUTS), act_calibration_method="rms,2")
    f = functools.partial(model.apply, params)
  else:  # QT (~20 s on 2 loaded cores, mostly compiling): the same pattern, batched
    qwix, rules = _dynamic_rules(act_calibration_method="rms,2")
    qat = qwix.quantize_model(model, qwix.QtProvider(rules))
    fq = lambda x: qat.apply(params, x[None])[0]  # noqa: E731
    f = lambda x: model.apply(params, x[None])[0]  # noqa: E731
  merged = qb.merge(f, fq, _box())
  specs = [n.attrs[1] for n in merged.fq_graph.nodes if n.kind == "round"]
  assert [s.norm for s in specs] == ["rms"] * 3
  assert [s.divisor for s in specs] == [127.5, 255.0, 255.0]  # sqrt(n) 127.5 / 2, n = 4, 16, 16
  _check_dynamic(f, fq, method="diff", sound=sound)


def test_qwix_dynamic_rms_calibration_nnx_is_paired_and_sound():
  qwix, rules = _dynamic_rules(act_calibration_method="rms,2")
  from flax import nnx

  model = _nnx_mlp()
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules), jnp.zeros(INPUTS))
  graphdef, state = nnx.split(model)
  q_graphdef, q_state = nnx.split(qmodel)
  f = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731
  fq = lambda x: nnx.merge(q_graphdef, q_state)(x)  # noqa: E731
  _check_dynamic(f, fq, method="diff")


@pytest.mark.slow  # ~40 s each at load 7, mostly compiling; test_trace_dynamic has the pattern cheaply
@pytest.mark.parametrize("provider", ["ptq", "qt"])
def test_qwix_dynamic_scales_per_tile_are_paired_and_sound(original, provider):
  """``tile_size=2``: a scale per tile of 2 entries along the contracted axis. qwix's PTQ then
  dequantizes before the product (x split into tiles, divided, rounded flat, rescaled per tile,
  flattened): one node per layer, one scale per tile, f given the same reshapes so the layers pair.
  QT (with ``rms,2``) computes the scales outside its custom VJP and does the same inside."""
  model, params = original
  if provider == "ptq":
    fq = _qwix_dynamic_ptq(model, params, jnp.zeros(INPUTS), tile_size=2)
    f = functools.partial(model.apply, params)
    shapes = [(2, 2), (8, 2), (8, 2)]
  else:
    qwix, rules = _dynamic_rules(tile_size=2, act_calibration_method="rms,2")
    qat = qwix.quantize_model(model, qwix.QtProvider(rules))
    fq = lambda x: qat.apply(params, x[None])[0]  # noqa: E731
    f = lambda x: model.apply(params, x[None])[0]  # noqa: E731
    shapes = [(1, 2, 2), (1, 8, 2), (1, 8, 2)]
  merged = qb.merge(f, fq, _box())
  assert [n.shape for n in merged.fq_graph.nodes if n.kind == "round"] == shapes
  _check_dynamic(f, fq, method="diff")


def _aqt():
  pytest.importorskip("aqt.jax.v2.flax.aqt_flax", reason="AQT is not installed (pip install 'qbound[aqt]')")
  from aqt.jax.v2 import calibration as aqt_calibration
  from aqt.jax.v2 import config as aqt_config
  from aqt.jax.v2.flax import aqt_flax
  return aqt_config, aqt_calibration, aqt_flax


def test_aqt_weight_quantization_is_paired_and_tight(original):
  aqt_config, _, aqt_flax = _aqt()
  model, params = original
  config = aqt_config.dot_general_make(lhs_bits=None, rhs_bits=8)  # int8 weights, float activations
  qmodel = _MLP(dot_general_cls=lambda: aqt_flax.AqtDotGeneral(config))
  fq = lambda x: qmodel.apply(params, x, rngs={"params": jax.random.key(0)})  # noqa: E731
  f = functools.partial(model.apply, params)
  assert np.max(np.abs(np.asarray(f(jnp.full(INPUTS, 0.3)) - fq(jnp.full(INPUTS, 0.3))))) > 0
  cert = qb.certify(f, fq, _box(), time_budget=60, target_gap=0.5)  # stops at 50%; 60 s for compiling
  merged = _check_sound(f, fq, cert)
  # AQT's (x @ W_int) * s_w is kept as one op beside f's x @ W: the layers pair.
  assert merged.paired and merged.fq_graph.nodes[1].op.name == "dot_general*scale"
  assert cert.lower > 0 and cert.upper <= 1.5 * cert.lower


def _static_mlp(model, params, calibration, **rule):
  """qwix post-training quantization with static (calibrated) activation scales: int8 weights and
  activations, the scales from the calibration batch (qwix's QAT provider collects them)."""
  qwix = pytest.importorskip("qwix", reason="qwix is not installed (pip install 'qbound[qwix]')")
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8", act_static_scale=True,
                                 **rule)]
  _, stats = qwix.quantize_model(model, qwix.QtProvider(rules)).apply(params, calibration, mutable=["quant_stats"])
  ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(ptq.init, jax.random.key(0), calibration[:1])
  qparams = qwix.quantize_params(params["params"], abstract["params"], stats["quant_stats"])
  return lambda x: ptq.apply({"params": qparams}, x[None])[0]


# rms,3: the calibrated scale is 3 sqrt(mean(x^2)) / 127.5, averaged over the batch: a constant
# like any other, the entries past it saturate (slow: ~30 s at load 6, as the absmax case)
@pytest.mark.parametrize("rule", [{}, pytest.param({"act_calibration_method": "rms,3"}, marks=pytest.mark.slow)])
def test_qwix_static_activation_scales_are_paired_and_sound(original, rule):
  model, params = original
  calibration = jax.random.uniform(jax.random.key(5), (64, INPUTS), minval=-1, maxval=1)
  fq = _static_mlp(model, params, calibration, **rule)
  f = lambda x: model.apply(params, x[None])[0]  # noqa: E731  (batched like f_q, so the layers line up)
  cert = qb.certify(f, fq, _box(), method="diff")
  merged = _check_sound(f, fq, cert)
  assert merged.paired  # x / s_a, round, saturate, (q @ W_int) * s_a * s_w beside (x / s_a) @ W * s_a
  assert 0 < cert.lower <= cert.upper


def test_qwix_static_activation_scales_nnx_are_sound():
  qwix = pytest.importorskip("qwix", reason="qwix is not installed (pip install 'qbound[qwix]')")
  from flax import nnx

  model = _nnx_mlp()
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
  calibration = jax.random.uniform(jax.random.key(5), (64, INPUTS), minval=-1, maxval=1)
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules), calibration)  # scales from this batch
  graphdef, state = nnx.split(model)
  q_graphdef, q_state = nnx.split(qmodel)
  f = lambda x: nnx.merge(graphdef, state)(x[None])[0]  # noqa: E731
  fq = lambda x: nnx.merge(q_graphdef, q_state)(x[None])[0]  # noqa: E731
  cert = qb.certify(f, fq, _box(), method="diff")
  assert _check_sound(f, fq, cert).paired
  assert 0 < cert.lower <= cert.upper


@pytest.mark.slow  # ~30 s on 2 loaded cores, mostly compiling the differential bound for a conv
def test_qwix_static_cnn_is_paired_and_sound():
  qwix = pytest.importorskip("qwix", reason="qwix is not installed (pip install 'qbound[qwix]')")

  model = _SmallCNN()
  params = model.init(jax.random.key(0), jnp.zeros((6, 6)))
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
  calibration = jax.random.uniform(jax.random.key(5), (32, 6, 6))
  qat = qwix.quantize_model(model, qwix.QtProvider(rules))
  _, stats = jax.vmap(lambda x: qat.apply(params, x, mutable=["quant_stats"]))(calibration)
  stats = jax.tree_util.tree_map(lambda a: a.mean(0) if a.ndim else a, stats)  # one scale from the batch
  ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(ptq.init, jax.random.key(0), jnp.zeros((6, 6)))
  qparams = qwix.quantize_params(params["params"], abstract["params"], stats["quant_stats"])
  fq = lambda x: ptq.apply({"params": qparams}, x)  # noqa: E731
  f = functools.partial(model.apply, params)
  box = qb.Box(jnp.full((6, 6), 0.4), jnp.full((6, 6), 0.6))
  cert = qb.certify(f, fq, box, method="diff")
  merged = _check_sound(f, fq, cert, box)
  assert merged.paired and merged.fq_graph.nodes[5].op.name == "conv_general_dilated*scale"
  assert 0 < cert.lower <= cert.upper


@pytest.mark.slow  # ~30 s: two certificates of 24-node networks
def test_aqt_static_activation_scales_are_sound(original):
  aqt_config, aqt_calibration, aqt_flax = _aqt()
  model, params = original

  def config(bound, po2):
    cfg = aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8)
    cfg.fwd.dg_quantizer.lhs.calibration = functools.partial(aqt_calibration.ConstantCalibration, bound=bound,
                                                             po2_scale=po2)
    return cfg

  f = functools.partial(model.apply, params)
  for po2 in (True, False):
    qmodel = _MLP(dot_general_cls=lambda: aqt_flax.AqtDotGeneral(config(2.0, po2)))
    fq = lambda x: qmodel.apply(params, x, rngs={"params": jax.random.key(0)})  # noqa: E731,B023
    cert = qb.certify(f, fq, _box(), method="diff" if po2 else "crown")
    merged = _check_sound(f, fq, cert)
    # AQT multiplies by 1 / s_a: f's product can undo that exactly only for a power of two.
    assert merged.paired == po2
    assert 0 < cert.lower <= cert.upper


@pytest.mark.slow  # 14 s at load 8 (AQT's model and the grid's programs compile); tests/test_exact_grid.py covers the method
def test_aqt_static_activation_scales_are_enumerated_on_small_boxes(original):
  # AQT rounds the input first (steps of 1/32 here): on a box of a few cells per entry, certify
  # bounds the error cell by cell (qbound.exact.grid), within 1.5x of the error reached.
  aqt_config, aqt_calibration, aqt_flax = _aqt()
  model, params = original
  cfg = aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8)
  cfg.fwd.dg_quantizer.lhs.calibration = functools.partial(aqt_calibration.ConstantCalibration, bound=2.0,
                                                           po2_scale=True)
  qmodel = _MLP(dot_general_cls=lambda: aqt_flax.AqtDotGeneral(cfg))
  f = functools.partial(model.apply, params)
  fq = lambda x: qmodel.apply(params, x, rngs={"params": jax.random.key(0)})  # noqa: E731
  box = qb.Box(jnp.array([0.2, -0.4, 0.1, -0.1]), jnp.array([0.325, -0.275, 0.225, 0.025]))
  cert = qb.certify(f, fq, box, time_budget=60)  # it returns once the gap is closed (seconds, cold)
  assert "grid" in cert.bounds
  _check_sound(f, fq, cert, box)
  assert cert.upper <= 1.5 * cert.lower


def test_aqt_dynamic_activation_scales_are_paired_and_sound(original):
  """AQT's default int8 activations: s = where(max|x| == 0, 1, max|x|) / 127.5, x * (1 / s) with
  an overflow guard, clipped to [-127, 127] before rounding; per token for a batch."""
  aqt_config, _, aqt_flax = _aqt()
  model, params = original
  config = aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8)
  qmodel = _MLP(dot_general_cls=lambda: aqt_flax.AqtDotGeneral(config))
  fq = lambda x: qmodel.apply(params, x, rngs={"params": jax.random.key(0)})  # noqa: E731
  f = functools.partial(model.apply, params)
  merged = qb.merge(f, fq, _box())
  ends = [(n.attrs[1].low, n.attrs[1].high) for n in merged.fq_graph.nodes if n.kind == "round"]
  assert ends == [(-127, 127)] * 3
  _check_dynamic(f, fq, method="diff")
  box = qb.Box(-jnp.ones((2, INPUTS)), jnp.ones((2, INPUTS)))
  _check_dynamic(f, fq, box, method="interval")


@pytest.mark.parametrize("library", ["qwix minmax", "aqt"])
def test_dynamic_scales_go_to_the_numpy_search(original, library):
  """certify(auto) on the 4-input MLP with dynamic activation scales (qwix's asymmetric ``minmax``
  with zero points, AQT's int8 with its clip before rounding and its overflow guard): the NumPy
  branch and bound models every dynamic rounding node (a chain layer of its own, nothing compiled
  for it), and its bounds hold."""
  from qbound.bounds import host_bab

  model, params = original
  f = functools.partial(model.apply, params)
  if library == "aqt":
    aqt_config, _, aqt_flax = _aqt()
    qmodel = _MLP(dot_general_cls=lambda: aqt_flax.AqtDotGeneral(aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8)))
    fq = lambda x: qmodel.apply(params, x, rngs={"params": jax.random.key(0)})  # noqa: E731
  else:
    fq = _qwix_dynamic_ptq(model, params, jnp.zeros(INPUTS), act_calibration_method="minmax")
  chain = host_bab.chain_of(qb.merge(f, fq, _box()))
  assert [layer[0] for layer in chain.layers].count("dynamic") == 3
  cert = _check_dynamic(f, fq, time_budget=3.0)
  assert "host-bab" in cert.bounds


@pytest.mark.slow  # about two minutes: it certifies seven models live
def test_walkthrough_notebook_runs(monkeypatch):
  pytest.importorskip("qwix", reason="qwix is not installed (pip install 'qbound[qwix]')")
  _aqt()
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  import os
  import pathlib

  root = pathlib.Path(__file__).resolve().parents[1]
  folder = root / "notebooks"
  # The kernel imports this checkout's qbound (not whichever one is installed).
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
  nb = nbformat.read(folder / "quant_libraries.ipynb", as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert text.count("paired=True") == 7  # 3 static or weight-only, 4 dynamic
