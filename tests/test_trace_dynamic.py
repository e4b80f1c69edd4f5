"""Dynamically scaled activation quantization (qbound.dynamic_rounding, qbound.trace.dynamic) without qwix.

What is checked: the bounds of a dynamic rounding node hold at sampled inputs of random boxes (the
band and the single-step bounds, as float32 computes the scale and the quotient, both ways XLA may),
for a scale per tensor, per row and per column, asymmetric scales with zero points and AQT's
clip-before-rounding; the pattern written by hand traces to one node beside f's identity, pairs, and
its certificate holds against sampling (per tensor, per row, in both float modes); what is not the
pattern (a scale that varies along a contracted axis) fails naming the line.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qbound as qb
from qbound import dynamic_rounding as DR

import helpers as H

_GUARD = ("lt", float(np.sqrt(np.finfo(np.float32).tiny)), 1.0)
SPECS = [DR.DynamicScale(127.5, -128, 127, guard=_GUARD),
         DR.DynamicScale(7.5, -8, 7, rounding="away"),
         DR.DynamicScale(127.5 / 0.9, -128, 127),  # qwix's "absmax,0.9": the largest entries saturate
         DR.DynamicScale(127.5, -128, 127, guard=_GUARD, axes=(-1,)),  # a scale per row (token)
         DR.DynamicScale(127.5, -128, 127, axes=(-2,)),  # a scale per column (channel)
         DR.DynamicScale(255.0, -128, 127, guard=_GUARD, axes=(-1,), zero_point=(-128.0, 255.0)),  # minmax
         DR.DynamicScale(15.0 / 0.8, -8, 7, zero_point=(-8.0, 15.0)),  # "minmax,0.8" int4: saturates
         DR.DynamicScale(127.5, -127, 127, guard=("lt", DR.RECIPROCAL_OVERFLOW, 1.0))]  # AQT


def _check_bounds(spec, lo, hi, rng, samples=100):
  """Samples of each box (and its two corners) stay within the node's bounds, both ways XLA computes."""
  n, shape = lo.shape[0], lo.shape[1:]
  half, flat, v_lo, v_hi = (np.asarray(a) for a in DR.bounds(spec, jnp.asarray(lo), jnp.asarray(hi), len(shape)))
  xs = lo[:, None] + rng.uniform(size=(n, samples, *shape)).astype(np.float32) * (hi - lo)[:, None]
  xs = np.concatenate([xs, lo[:, None], hi[:, None]], axis=1)
  for reciprocal in (False, True):
    q = np.asarray(jax.vmap(jax.vmap(lambda x: H.dynamic_quant_library(spec, x, reciprocal)))(jnp.asarray(xs)))
    assert np.all(np.abs(q.astype(np.float64) - xs) <= half[:, None] * (1 + 1e-6))
    inside = (q >= v_lo[:, None]) & (q <= v_hi[:, None])
    assert np.all(inside | ~flat[:, None])
  return flat


def _random_boxes(rng, n, shape):
  scale = rng.choice([1e-3, 1.0, 30.0], size=(n,) + (1,) * len(shape))
  centre = rng.normal(size=(n, *shape)) * scale
  # some boxes all positive, as after a ReLU
  centre = np.where(rng.uniform(size=(n,) + (1,) * len(shape)) < 0.3, np.abs(centre), centre)
  spread = rng.choice([0.0, 1e-4, 1e-2, 0.3], size=(n,) + (1,) * len(shape)) * np.abs(centre).max(
      axis=tuple(range(1, centre.ndim)), keepdims=True)
  radius = np.abs(rng.normal(size=(n, *shape))) * spread
  return (centre - radius).astype(np.float32), (centre + radius).astype(np.float32)


@pytest.mark.parametrize("spec", SPECS)
def test_bounds_hold_at_sampled_inputs(spec):
  rng = np.random.default_rng(0)
  lo, hi = _random_boxes(rng, 120, (2, 3))
  flat = _check_bounds(spec, lo, hi, rng)
  assert flat.any() and (~flat).any()  # both kinds of bounds are exercised


@given(st.integers(0, 2**31 - 1), st.sampled_from(SPECS), st.sampled_from([(4,), (2, 3), (3, 1, 2)]))
def test_bounds_hold_in_random_boxes(seed, spec, shape):
  axes = spec.axes
  if axes is not None and -axes[0] > len(shape):
    axes = (-1,)
  spec = DR.DynamicScale(spec.divisor, spec.low, spec.high, spec.rounding, spec.guard, axes, spec.zero_point)
  rng = np.random.default_rng(seed)
  lo, hi = _random_boxes(rng, 20, shape)
  _check_bounds(spec, lo, hi, rng, samples=50)


def _boxes_across_the_zero_tie(spec, rng, n, entries=4, top=1.0):
  """``n`` boxes of ``entries`` entries around inputs on the zero point's tie: the argument
  ``offset + span * share`` is an integer + 1/2 (``share = -min / (max - min)``), with the largest
  entry ``top`` and the smallest at the tie's value, at random places; widths 1e-6..1e-4 of ``top``."""
  offset, span = spec.zero_point
  tie = (np.floor(offset + span / 2) + 0.5 - offset) / span
  lowest = -top * tie / (1 - tie)
  centre = rng.uniform(lowest, top, size=(n, entries))
  for row in centre:
    i, j = rng.choice(entries, size=2, replace=False)
    row[i], row[j] = top, lowest
  width = rng.choice([1e-6, 1e-5, 1e-4], size=(n, 1)) * top * np.ones(entries)
  return (centre - width).astype(np.float32), (centre + width).astype(np.float32)


@pytest.mark.parametrize("spec", [SPECS[5], SPECS[6]], ids=["minmax int8", "minmax,0.8 int4"])
def test_boxes_across_the_zero_points_tie_are_sound_and_pin_the_steps_both_cases_agree_on(spec):
  """Where a box holds inputs whose zero points differ by one (their largest and smallest entries
  nearly opposite: qwix's minmax at int8 puts the tie at max t = -min t), each entry is bounded in
  both cases: sound at samples of the box (with both zero points among them), and the entries that
  both cases pin (none before) are pinned."""
  spec = DR.DynamicScale(spec.divisor, spec.low, spec.high, spec.rounding, spec.guard, (-1,), spec.zero_point)
  rng = np.random.default_rng(0)
  offset, span = spec.zero_point
  lo, hi = _boxes_across_the_zero_tie(spec, rng, 64)
  flat = _check_bounds(spec, lo, hi, rng, samples=200)
  xs = lo[:, None] + rng.uniform(size=(64, 200, 4)).astype(np.float32) * (hi - lo)[:, None]
  c = span / spec.divisor
  low, high = np.minimum(xs.min(-1), 0) * c, np.maximum(xs.max(-1), 0) * c
  zeros = np.round(offset - low / ((high - low) / span))
  across = zeros.max(1) > zeros.min(1)
  assert across.sum() >= 16  # the boxes do hold both zero points
  assert flat[across].any()  # ... and entries both cases pin are known there


@given(st.integers(0, 2**31 - 1), st.sampled_from([SPECS[5], SPECS[6]]), st.sampled_from([2, 4, 7]),
       st.sampled_from([1e-3, 1.0, 30.0]))
def test_bounds_across_the_zero_points_tie_hold(seed, spec, entries, top):
  spec = DR.DynamicScale(spec.divisor, spec.low, spec.high, spec.rounding, spec.guard, (-1,), spec.zero_point)
  rng = np.random.default_rng(seed)
  lo, hi = _boxes_across_the_zero_tie(spec, rng, 16, entries, top)
  _check_bounds(spec, lo, hi, rng, samples=100)


def _fq(w1, b1, w2):
  def quantized_dense(x, w):
    s = jnp.max(jnp.abs(x)) / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
    c = jnp.round(x / s).astype(jnp.int8)  # saturates at [-128, 127]
    return (c.astype(jnp.float32) @ w) * s

  return lambda x: quantized_dense(jax.nn.relu(quantized_dense(x, w1) + b1), w2)


def test_hand_written_pattern_pairs_and_is_sound():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  w1, w2 = jax.random.normal(k1, (3, 8)), jax.random.normal(k2, (8, 2))
  b1 = 0.1 * jax.random.normal(k3, (8,))
  f = lambda x: jax.nn.relu(x @ w1 + b1) @ w2  # noqa: E731
  fq = _fq(w1, b1, w2)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  assert merged.paired
  assert [n.attrs[0] for n in merged.fq_graph.nodes if n.kind == "round"] == ["dynamic", "dynamic"]
  points = H.sample_points(box, 3000)
  np.testing.assert_allclose(np.asarray(jax.vmap(merged.fq_graph)(jnp.asarray(points, jnp.float32))),
                             np.asarray(jax.vmap(fq)(jnp.asarray(points, jnp.float32))), atol=1e-5)
  for method in ("interval", "diff"):
    cert = qb.certify(f, fq, box, method=method)
    assert np.max(np.abs(H.eval64(merged, points))) <= cert.upper
    xs = jnp.asarray(points, jnp.float32)
    errors = np.abs(np.asarray(jax.vmap(f)(xs) - jax.vmap(fq)(xs)))
    assert errors.max() <= cert.upper * (1 + 1e-5)
    assert 0 < cert.lower <= cert.upper


def test_a_clip_after_the_rounding_is_the_same_node():
  """``jnp.clip(round(x / s), lo, hi)`` (``jnp.clip`` writes ``max(lo, r)``, the constant first)
  saturates as the integer cast does: one dynamic rounding node with those ends."""
  w = jnp.ones((3, 2))

  def fq(x):
    s = jnp.max(jnp.abs(x)) / 7.5
    s = jnp.where(s < 1e-19, 1.0, s)
    return (jnp.clip(jnp.round(x / s), -8, 7) @ w) * s

  (node,) = [n for n in qb.trace(fq, jnp.zeros(3)).nodes if n.kind == "round"]
  assert node.attrs[0] == "dynamic" and (node.attrs[1].low, node.attrs[1].high) == (-8, 7)


def test_a_box_where_the_guard_may_fire_is_sound():
  """Near 0 the scale falls below qwix's guard (s -> 1, q = 0): covered, not refused."""
  k1, k2 = jax.random.split(jax.random.key(1))
  w1, w2, b1 = jax.random.normal(k1, (3, 4)), jax.random.normal(k2, (4, 2)), jnp.full(4, 1e-19)
  fq = _fq(w1, b1, w2)
  f = lambda x: jax.nn.relu(x @ w1 + b1) @ w2  # noqa: E731
  box = qb.Box(jnp.full(3, -1e-18), jnp.full(3, 1e-18))
  cert = qb.certify(f, fq, box, method="diff")
  xs = jnp.asarray(H.sample_points(box, 500), jnp.float32)
  assert np.max(np.abs(np.asarray(jax.vmap(f)(xs) - jax.vmap(fq)(xs)))) <= cert.upper


def _per_row(w):
  def fq(x):  # x: (rows, n), one scale per row (token), as qwix quantizes a batch
    s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
    return (jnp.round(x / s) @ w) * s
  return fq


@pytest.mark.parametrize("sound", [True, False])
def test_a_scale_per_row_pairs_and_is_sound(sound):
  w = jax.random.normal(jax.random.key(2), (3, 2))
  fq, f = _per_row(w), lambda x: x @ w  # noqa: E731
  box = qb.Box(jnp.array([[-1.0, 0.0, 0.5], [-0.1, 0.2, 0.1]]), jnp.array([[1.0, 0.5, 1.0], [0.1, 0.3, 0.2]]))
  merged = qb.merge(f, fq, box)
  assert merged.paired
  (node,) = [n for n in merged.fq_graph.nodes if n.kind == "round"]
  assert node.attrs[1].axes == (-1,)
  xs = jnp.asarray(H.sample_points(box, 3000), jnp.float32)
  np.testing.assert_allclose(np.asarray(jax.vmap(merged.fq_graph)(xs)), np.asarray(jax.vmap(fq)(xs)), atol=1e-5)
  cert = qb.certify(f, fq, box, method="diff", sound=sound)
  errors = np.abs(np.asarray(jax.vmap(f)(xs) - jax.vmap(fq)(xs)))
  assert errors.max() <= cert.upper * (1 + 1e-5)
  # the second row's scale is about 3x smaller: its outputs' error is bounded separately, tighter
  rows = np.abs(np.reshape(np.stack([cert.diff_lower, cert.diff_upper]), (2, 2, 2))).max(axis=(0, 2))
  assert rows[1] < rows[0] / 2


def _per_column(x):
  s = jnp.max(jnp.abs(x), axis=0, keepdims=True) / 127.5  # x: (2, 3), one scale per column
  return jnp.where(s < 1e-19, 1.0, s)


def test_a_fake_quantized_scale_per_column_is_sound():
  """Dequantized before the product (qwix's QT forward), a scale per column is one node too."""
  w = jax.random.normal(jax.random.key(3), (3, 2))
  fq = lambda x: (jnp.round(x / _per_column(x)) * _per_column(x)) @ w  # noqa: E731
  box = qb.Box(-jnp.ones((2, 3)), jnp.ones((2, 3)))
  merged = qb.merge(lambda x: x @ w, fq, box)
  assert [n.attrs[1].axes for n in merged.fq_graph.nodes if n.kind == "round"] == [(-2,)]
  cert = qb.certify(lambda x: x @ w, fq, box, method="diff")
  xs = jnp.asarray(H.sample_points(box, 3000), jnp.float32)
  assert np.abs(np.asarray(jax.vmap(lambda x: x @ w)(xs) - jax.vmap(fq)(xs))).max() <= cert.upper


def test_a_scale_along_the_contracted_axis_is_refused_naming_the_line():
  """(round(x / s) @ W) * s is no product of q(x) when s varies along the contracted axis."""
  w = jnp.ones((3, 2))

  def fq(x):
    s = _per_column(x)
    return (jnp.round(x / s) @ w) * jnp.max(s)

  with pytest.raises(qb.UnsupportedPrimitiveError) as err:
    qb.merge(lambda x: x @ w, fq, qb.Box(-jnp.ones((2, 3)), jnp.ones((2, 3))))
  assert "test_trace_dynamic.py" in str(err.value)


# qwix's rms calibration (qbound.rms_rounding): s = c sqrt(mean(x^2)) / Q, the entries past Q s
# saturate. (c, Q, low, high, guard, axes): the divisor depends on the group's size n, sqrt(n) Q / c.
RMS = [(1.0, 127.5, -128, 127, _GUARD, None),  # rms,1: the largest entries saturate
       (0.5, 127.5, -128, 127, None, (-1,)),  # a scale per row, most of it saturates
       (3.0, 127.5, -128, 127, _GUARD, None),  # rms,3: for n <= 9, |x / s| <= D <= 127.5: no saturation
       (2.0, 7.5, -8, 7, _GUARD, None),  # int4
       (1.5, 127.5, -128, 127, _GUARD, (-1,))]  # a scale per row, a few of its entries saturate at once


def _rms_spec(case, shape):
  c, q, low, high, guard, axes = case
  n = int(np.prod(shape if axes is None else [shape[a] for a in axes]))
  return DR.DynamicScale(float(np.sqrt(n)) * q / c, low, high, guard=guard, axes=axes, norm="rms")


def _rms_library(case, x):
  """qwix's float32 computation (``qwix/_src/core/qarray.py``: calibrate, compute_scale_zero_point,
  quantize_with_scale_zero_point), independent of :func:`qbound.dynamic_rounding.quantize`."""
  c, q, low, high, guard, axes = case
  s = jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=axes is not None)) * jnp.float32(c) / jnp.float32(q)
  if guard is not None:
    s = jnp.where(s < guard[1], jnp.ones_like(s), s)
  return s * jnp.clip(jnp.round(x / s), low, high)


def _check_rms(case, lo, hi, rng, samples=100):
  n, shape = lo.shape[0], lo.shape[1:]
  spec = _rms_spec(case, shape)
  half, flat, v_lo, v_hi = (np.asarray(a) for a in DR.bounds(spec, jnp.asarray(lo), jnp.asarray(hi), len(shape)))
  xs = lo[:, None] + rng.uniform(size=(n, samples, *shape)).astype(np.float32) * (hi - lo)[:, None]
  corners = np.where(rng.uniform(size=(n, 8, *shape)) < 0.5, lo[:, None], hi[:, None])  # where saturation peaks
  xs = np.concatenate([xs, corners, lo[:, None], hi[:, None]], axis=1)
  q = np.asarray(jax.vmap(jax.vmap(lambda x: _rms_library(case, x)))(jnp.asarray(xs)))
  assert np.all(np.abs(q.astype(np.float64) - xs) <= half[:, None] * (1 + 1e-6))
  assert np.all((q >= v_lo[:, None]) & (q <= v_hi[:, None]) | ~flat[:, None])
  graph_q = np.asarray(jax.vmap(jax.vmap(lambda x: DR.quantize(spec, x)))(jnp.asarray(xs)))
  np.testing.assert_allclose(graph_q, q, atol=1e-5 * np.abs(xs).max())  # the node computes what qwix does
  _check_saturation(spec, lo, hi, xs, q)
  return half, flat


def _check_saturation(spec, lo, hi, xs, q):
  """The error split (qbound.rms_rounding.parts): every entry within its band, those past it within
  their saturation's, and no more of them in a group at once than joint_saturation's count."""
  shape = lo.shape[1:]
  p = DR.saturation_parts(spec, jnp.asarray(lo), jnp.asarray(hi), len(shape))
  base, top, bottom = (np.asarray(a, np.float64)[:, None] for a in (p.base, p.over_top, p.over_bottom))
  e = q.astype(np.float64) - xs
  assert np.all(e >= -(base + top) * (1 + 1e-6)) and np.all(e <= (base + bottom) * (1 + 1e-6))
  joint = DR.joint_saturation(spec, shape)
  if joint is not None:
    count, axes = joint
    past = np.abs(e) > base * (1 + 1e-6)
    assert np.all(np.sum(past, axis=tuple(a + 2 for a in axes)) <= count)


def _dominated_boxes(rng, n, shape):
  """Random boxes, some with one entry far above the others (it saturates under rms scales)."""
  lo, hi = _random_boxes(rng, n, shape)
  pick = rng.uniform(size=(n,)) < 0.5
  boost = np.where(pick[:, None], 6.0, 1.0).reshape((n,) + (1,) * len(shape))
  first = np.zeros(shape, bool).reshape(-1)
  first[0] = True
  first = first.reshape(shape)
  return np.where(first, lo * boost, lo).astype(np.float32), np.where(first, hi * boost, hi).astype(np.float32)


@pytest.mark.parametrize("case", RMS)
def test_rms_bounds_hold_at_sampled_inputs(case):
  rng = np.random.default_rng(1)
  lo, hi = _dominated_boxes(rng, 120, (2, 3))
  half, flat = _check_rms(case, lo, hi, rng)
  assert flat.any() and (~flat).any()


@given(st.integers(0, 2**31 - 1), st.sampled_from(RMS), st.sampled_from([(4,), (2, 3), (3, 1, 2), (16,)]))
def test_rms_bounds_hold_in_random_boxes(seed, case, shape):
  rng = np.random.default_rng(seed)
  lo, hi = _dominated_boxes(rng, 20, shape)
  _check_rms(case, lo, hi, rng, samples=50)


def test_rms_band_is_the_saturation_error_on_a_point():
  """On a box that is a point, the band is the entry's own error where it saturates (the bound is
  tight, not a multiple of the scale), and where it does not, at most half a step."""
  case = RMS[0]  # rms,1 on 4 entries: D = 255, the first entry saturates (u = 255 * 0.96 > 127.5)
  x = np.array([[3.0, 0.5, -0.4, 0.6]], np.float32)
  half, _ = _check_rms(case, x, x, np.random.default_rng(0), samples=1)
  error = np.abs(np.asarray(_rms_library(case, jnp.asarray(x[0]))) - x[0])
  assert error[0] > 1.0 and half[0, 0] <= error[0] * (1 + 1e-4)
  s = float(np.sqrt(np.mean(x**2))) / 127.5
  assert np.all(half[0, 1:] <= s / 2 * (1 + 1e-2))  # and float32 slack (m 2^-17)


def test_rms_saturation_count_is_reached_and_joint():
  """rms,3 on 16 entries (D = 170): one entry at a time can saturate (qwix's 4-16-16-2 MLP rows), and
  the joint bound counts one clip where the box relaxation counts sixteen."""
  case = (3.0, 127.5, -128, 127, _GUARD, None)
  spec = _rms_spec(case, (16,))
  assert DR.joint_saturation(spec, (16,)) == (1, (0,))
  x = np.full((1, 16), 0.05, np.float32)
  x[0, 3] = 2.0  # u = 170 * 2 / sqrt(4 + 15 * 0.0025) = 169 > 127.5: saturates, error 0.49
  lo, hi = np.zeros((1, 16), np.float32), np.full((1, 16), 2.0, np.float32)
  rng = np.random.default_rng(0)
  _check_rms(case, lo, hi, rng)
  q = np.asarray(_rms_library(case, jnp.asarray(x[0])))
  e = q - x[0]
  p = DR.saturation_parts(spec, jnp.asarray(lo), jnp.asarray(hi), 1)
  assert e[3] < -0.4 and -e[3] <= float(p.base[0, 3] + p.over_top[0, 3])
  assert np.all(np.abs(np.delete(e, 3)) <= np.asarray(p.base[0, :15]))
  node = qb.graph.Node(kind="round", inputs=(0,), shape=(16,), attrs=(DR.DYNAMIC, spec))
  from qbound.bounds import saturation
  rows = jnp.ones((1, 16))
  saved, _ = saturation.saving(node, rows, p.over_top[0], p.over_bottom[0], sound=True)
  # positive rows read the lower offsets' clips past the top: all but the largest are saved
  np.testing.assert_allclose(float(saved[0]), float(jnp.sum(p.over_top) - jnp.max(p.over_top)), rtol=1e-5)


@given(st.integers(0, 2**31 - 1), st.sampled_from([c for c in RMS if c[0] > 1]), st.sampled_from([(2, 3), (16,), (2, 8)]))
def test_rms_rows_bound_the_error_jointly(seed, case, shape):
  """A backward pass's rows meet the node's lines: ``rows . q(x)`` stays above what the relaxation
  and the joint saving give, at sampled and dominated inputs (sound and float mode)."""
  from qbound.bounds import relax, saturation
  rng = np.random.default_rng(seed)
  lo, hi = _dominated_boxes(rng, 1, shape)
  lo, hi = lo[0], hi[0]
  spec = _rms_spec(case, shape)
  node = qb.graph.Node(kind="round", inputs=(0,), shape=shape, attrs=(DR.DYNAMIC, spec))
  xs = lo + rng.uniform(size=(300, *shape)).astype(np.float32) * (hi - lo)
  corners = np.where(rng.uniform(size=(100, *shape)) < 0.5, lo, hi)
  xs = np.concatenate([xs, corners]).astype(np.float32)
  q = np.asarray(jax.vmap(lambda x: _rms_library(case, x))(jnp.asarray(xs)), np.float64)
  rows = jnp.asarray(rng.normal(size=(8, *shape)), jnp.float32)
  for sound in (True, False):
    r = relax.rounding(jnp.asarray(lo), jnp.asarray(hi), "dynamic", sound=sound, node=node)
    pos, neg = jnp.maximum(rows, 0), jnp.minimum(rows, 0)
    slope = np.asarray(pos * r.lower_slope + neg * r.upper_slope, np.float64).reshape(8, -1)
    offset = np.asarray(jnp.sum((pos * r.lower_offset + neg * r.upper_offset).reshape(8, -1), axis=1), np.float64)
    if saturation.applies(node):
      saved, margin = saturation.saving(node, rows, r.sat_lower, r.sat_upper, sound=sound)
      offset = offset + np.asarray(saved, np.float64) - np.asarray(margin, np.float64)
    value = q.reshape(len(xs), -1) @ np.asarray(rows, np.float64).reshape(8, -1).T
    bound = xs.reshape(len(xs), -1).astype(np.float64) @ slope.T + offset
    assert np.all(value >= bound - 1e-6 * np.abs(value).max())


def test_rms_guard_near_zero_is_covered():
  lo, hi = np.full((1, 4), -1e-21, np.float32), np.full((1, 4), 1e-21, np.float32)
  half, flat = _check_rms(RMS[0], lo, hi, np.random.default_rng(0))
  assert not flat.any() and np.all(half < 1e-18)


def _rms_fq(w, c=1.0):
  def fq(x):  # qwix's rms,c written out, a scale per row
    s = jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True)) * c / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
    return (jnp.round(x / s).astype(jnp.int8).astype(jnp.float32) @ w) * s
  return fq


@pytest.mark.parametrize("sound", [True, False])
def test_an_rms_scale_per_row_pairs_and_is_sound(sound):
  w = jax.random.normal(jax.random.key(5), (4, 2))
  fq, f = _rms_fq(w), lambda x: x @ w  # noqa: E731
  box = qb.Box(jnp.array([[0.5, -0.2, -0.1, 0.0], [-0.1, 0.2, 0.1, 0.0]]),
               jnp.array([[2.0, 0.2, 0.1, 0.1], [0.1, 0.3, 0.2, 0.1]]))
  merged = qb.merge(f, fq, box)
  assert merged.paired
  (node,) = [n for n in merged.fq_graph.nodes if n.kind == "round"]
  assert node.attrs[1].norm == "rms" and node.attrs[1].axes == (-1,) and node.attrs[1].divisor == 255.0
  xs = jnp.asarray(np.concatenate([H.sample_points(box, 3000), H.grid(box, 2)]), jnp.float32)
  np.testing.assert_allclose(np.asarray(jax.vmap(merged.fq_graph)(xs)), np.asarray(jax.vmap(fq)(xs)), atol=1e-5)
  errors = np.abs(np.asarray(jax.vmap(f)(xs) - jax.vmap(fq)(xs)))
  for method in ("interval", "diff"):
    cert = qb.certify(f, fq, box, method=method, sound=sound)
    assert errors.max() <= cert.upper * (1 + 1e-5)
    assert np.max(np.abs(H.eval64(merged, np.asarray(xs, np.float64)))) <= cert.upper
    assert 0 < cert.lower <= cert.upper


def _rms_mlp(c=3.0):
  """A 3-16-2 ReLU net and its copy with qwix's rms,c on the 16 hidden entries (one may saturate)."""
  keys = jax.random.split(jax.random.key(11), 3)
  w1, b1 = jax.random.normal(keys[0], (3, 16)), 0.3 * jax.random.normal(keys[1], (16,))
  w2 = jax.random.normal(keys[2], (16, 2)) / 4

  def f(x):
    return jax.nn.relu(x @ w1 + b1) @ w2

  def fq(x):
    h = jax.nn.relu(x @ w1 + b1)
    s = jnp.sqrt(jnp.mean(jnp.square(h))) * c / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
    return (jnp.round(h / s).astype(jnp.int8).astype(jnp.float32) @ w2) * s
  return f, fq


_RMS_BOX = qb.Box(jnp.array([-1.0, -1.0, 0.5]), jnp.array([1.0, -0.5, 1.0]))


def _joint_bounds_are_sound(f, fq, box, methods, sound):
  from qbound.bounds import saturation
  merged = qb.merge(f, fq, box)
  (node,) = [n for n in merged.fq_graph.nodes if n.kind == "round"]
  assert saturation.applies(node)
  xs = jnp.asarray(H.sample_points(box, 4000), jnp.float32)
  errors = np.abs(np.asarray(jax.vmap(f)(xs) - jax.vmap(fq)(xs)))
  exact = np.max(np.abs(H.eval64(merged, np.asarray(xs, np.float64))))
  bounds = {}
  for method in methods:
    cert = qb.certify(f, fq, box, method=method, sound=sound)
    assert max(errors.max(), exact) <= cert.upper * (1 + 1e-6) and 0 < cert.lower <= cert.upper
    bounds[method] = cert.upper
  return bounds


def test_joint_saturation_diff_bound_is_sound():
  """rms,3 on 16 hidden entries (one may saturate at a time): the differential bound, which counts
  one clip, stays above the errors sampled, at vertices and in float64."""
  f, fq = _rms_mlp()
  merged = qb.merge(f, fq, _RMS_BOX)
  bound = qb.bounds.diff(merged, None, _RMS_BOX)
  xs = H.sample_points(_RMS_BOX, 4000)
  errors = np.asarray(jax.vmap(f)(jnp.asarray(xs, jnp.float32)) - jax.vmap(fq)(jnp.asarray(xs, jnp.float32)))
  for e in (errors, H.eval64(merged, xs)):
    assert np.all((np.asarray(bound.lower) <= e) & (e <= np.asarray(bound.upper)))
  assert np.max(np.abs(errors)) > 0.05  # saturation reached (a half step alone is below 0.02 here)


@pytest.mark.slow
@pytest.mark.parametrize("sound", [True, False])
def test_joint_saturation_bounds_are_sound_and_tighter(sound):
  """CROWN and the differential bounds with the joint count, in both float modes, sound and below
  what every entry's own clip would give (~90 s at load 10: four compilations of each pass)."""
  from qbound.bounds import saturation
  f, fq = _rms_mlp()
  box = _RMS_BOX
  joint = _joint_bounds_are_sound(f, fq, box, ("crown", "diff"), sound)
  try:  # the same bounds with every entry's clip counted
    saturation.ENABLED = False
    jax.clear_caches()
    alone = {m: qb.certify(f, fq, box, method=m, sound=sound).upper for m in joint}
  finally:
    saturation.ENABLED = True
    jax.clear_caches()
  assert all(joint[m] < alone[m] for m in joint), (joint, alone)


def _tiled(w, back):
  """A scale per tile of 2 entries along the contracted axis, dequantized before the product (qwix's
  ``tile_size``): x split into tiles, divided, flattened to round, split again to rescale, flattened
  by ``back`` for the product."""
  def fq(x):
    tiles = x.reshape(2, 2)
    s = jnp.max(jnp.abs(tiles), axis=1, keepdims=True) / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
    c = jnp.round((tiles / s).reshape(4)).astype(jnp.int8).astype(jnp.float32)
    return back(c.reshape(2, 2) * s) @ w
  return fq


def test_a_scale_per_tile_of_the_contracted_axis_pairs_when_dequantized_first():
  """Reshapes around the rounding: f gets the same reshapes (proven to move every entry back), so
  the layers pair; a layout that does not come back (a transpose) does not pair, and stays sound."""
  w = jax.random.normal(jax.random.key(6), (4, 2))
  f = lambda x: x @ w  # noqa: E731
  box = qb.Box(jnp.array([-1.0, 0.2, -0.1, 0.5]), jnp.array([1.0, 0.4, 0.1, 0.6]))
  xs = jnp.asarray(np.concatenate([H.sample_points(box, 3000), H.grid(box, 2)]), jnp.float32)
  for back, paired in ((lambda v: v.reshape(4), True), (lambda v: v.T.reshape(4), False)):
    fq = _tiled(w if paired else w[jnp.array([0, 2, 1, 3])], back)
    merged = qb.merge(f, fq, box)
    assert merged.paired == paired
    (node,) = [n for n in merged.fq_graph.nodes if n.kind == "round"]
    assert node.attrs[1].axes == (-1,) and node.shape == (2, 2)  # one scale per tile
    np.testing.assert_allclose(np.asarray(jax.vmap(merged.fq_graph)(xs)), np.asarray(jax.vmap(fq)(xs)), atol=1e-5)
    cert = qb.certify(f, fq, box, method="diff" if paired else "crown")
    errors = np.abs(np.asarray(jax.vmap(f)(xs) - jax.vmap(fq)(xs)))
    assert errors.max() <= cert.upper * (1 + 1e-5) and 0 < cert.lower <= cert.upper
