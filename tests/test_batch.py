"""Tests of qbound.certify_batch: every box gets what qbound.certify gives it alone, whatever the
chunking, and bad calls get clear errors."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound.box import box_at

N_BOXES = 5


@pytest.fixture(scope="module")
def pair():
  # One hidden layer: the differential bounds' compilation grows steeply with depth.
  f, fq, _, _ = H.random_pair(0, (2, (8,), 2), bits=4)
  centres = jax.random.uniform(jax.random.key(1), (N_BOXES, 2), minval=-1, maxval=1)
  return f, fq, qb.linf_ball(centres, 0.2)


def assert_same(b: qb.Certificate, c: qb.Certificate):
  """Two certificates of one box agree to float rounding (batched products may sum in another order)."""
  assert b.upper == pytest.approx(c.upper, rel=1e-5, abs=1e-7)
  np.testing.assert_allclose(b.diff_lower, c.diff_lower, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(b.diff_upper, c.diff_upper, rtol=1e-5, atol=1e-7)
  assert b.lower == pytest.approx(c.lower, rel=1e-5, abs=1e-9)
  np.testing.assert_allclose(b.witness, c.witness, atol=1e-5)
  np.testing.assert_allclose(b.witness_diff, c.witness_diff, rtol=1e-4, atol=1e-8)
  assert b.lower_float32 == pytest.approx(c.lower_float32, rel=1e-4, abs=1e-7)
  assert (b.method, b.sound, list(b.bounds)) == (c.method, c.sound, list(c.bounds))
  np.testing.assert_array_equal(b.box_lower, c.box_lower)
  np.testing.assert_array_equal(b.box_upper, c.box_upper)


def check_against_certify(f, fq, boxes, method, key, batch, **options):
  keys = jax.random.split(key, boxes.lower.shape[0])
  for i in range(boxes.lower.shape[0]):
    single = qb.certify(f, fq, box_at(boxes, i), method=method, key=keys[i], search=H.search(), **options)
    assert_same(batch[i], single)


@pytest.mark.parametrize("method", ["interval", "crown", "diff-interval", "diff"])
def test_each_box_gets_what_certify_gives_it(pair, method):
  f, fq, boxes = pair
  key = jax.random.key(7)
  batch = qb.certify_batch(f, fq, boxes, method=method, key=key, search=H.search(), progress=False)
  assert len(batch) == N_BOXES and batch.method == method
  assert np.all((0 <= batch.lower) & (batch.lower <= batch.upper))
  check_against_certify(f, fq, boxes, method, key, batch)


@pytest.mark.parametrize("method", ["crown", "diff"])
def test_deep_graphs_are_bounded_step_by_step_with_the_same_results(pair, method, monkeypatch):
  # Graphs of STEP_NODES nodes or more skip the one program per chunk (its compilation grows with
  # the square of the depth); here every graph is made to, and each box still gets what certify gives.
  f, fq, boxes = pair
  key = jax.random.key(7)
  monkeypatch.setattr(qb.batch, "STEP_NODES", 0)
  batch = qb.certify_batch(f, fq, boxes, method=method, key=key, search=H.search(), progress=False)
  assert batch.layout["bounds"] == "steps" and batch.layout["device_of_box"] == [0] * N_BOXES
  check_against_certify(f, fq, boxes, method, key, batch)


@pytest.mark.slow
def test_alpha_matches_certify(pair):
  f, fq, boxes = pair
  key = jax.random.key(7)
  batch = qb.certify_batch(f, fq, boxes, method="alpha", key=key, search=H.search(), alpha_steps=5,
                           progress=False)
  assert set(batch.bounds) == {"crown", "diff", "diff-alpha", "alpha"}
  assert np.all(batch.bounds["alpha"] <= batch.bounds["diff"] + 1e-12)
  check_against_certify(f, fq, boxes, "alpha", key, batch, alpha_steps=5)


@pytest.fixture
def buffers_only(monkeypatch):
  """Budgets count XLA's buffers only, not the process (which on CPU they also include)."""
  monkeypatch.setattr(qb.memory, "process_bytes", lambda: 0)
  monkeypatch.setattr(qb.memory, "CPU_ALLOWANCE", 0)


def test_chunks_and_row_blocks_change_nothing(pair, buffers_only):
  """One box and three backward rows per call, from a tiny budget: the same certificates."""
  f, fq, boxes = pair
  key = jax.random.key(7)
  merged = qb.merge(f, fq, box_at(boxes, 0))
  search = qb.Search(samples=8, restarts=2, steps=5)  # so that the backward rows dominate the footprint
  whole = qb.certify_batch(merged, None, boxes, method="crown", key=key, search=search,
                           memory_budget=math.inf, progress=False)
  p = qb.memory.plan(merged, "crown", budget=math.inf, search=search)
  budget = p.fixed + max(p.per_box + 3 * p.per_row, p.search_per_box)
  small = qb.certify_batch(merged, None, boxes, method="crown", key=key, search=search,
                           memory_budget=budget, progress=False)
  assert whole.layout["chunk"] == N_BOXES and whole.layout["row_chunk"] is None
  assert small.layout["chunk"] == 1 and small.layout["row_chunk"] == 3
  assert small.layout["memory_estimate"] <= budget
  np.testing.assert_allclose(small.upper, whole.upper, rtol=1e-6)
  np.testing.assert_allclose(small.diff_lower, whole.diff_lower, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(small.lower, whole.lower, rtol=1e-6)


def test_last_chunk_is_padded_not_recompiled(pair):
  f, fq, boxes = pair
  merged = qb.merge(f, fq, box_at(boxes, 0))
  run = lambda b: qb.certify_batch(merged, None, b, method="interval", search=H.search(), progress=False,
                                   memory_budget=math.inf)
  first = run(boxes)
  assert first.layout["chunk"] == N_BOXES
  cache = getattr(qb.batch._bounds_chunk, "_cache_size", lambda: None)
  before = cache()
  again = run(qb.Box(boxes.lower[::-1], boxes.upper[::-1]))
  assert cache() == before  # same chunk shape: no new compilation
  np.testing.assert_allclose(again.upper, first.upper[::-1], rtol=1e-6)


def test_results_round_trip_and_read_well(pair):
  f, fq, boxes = pair
  batch = qb.certify_batch(f, fq, boxes, method="interval", search=H.search(), progress=False)
  back = qb.BatchCertificate.from_json(batch.to_json())
  np.testing.assert_array_equal(back.upper, batch.upper)
  with pytest.raises(ValueError, match="above the proven upper"):
    qb.BatchCertificate.from_dict({**batch.to_dict(), "lower": (batch.upper + 1).tolist()})
  np.testing.assert_array_equal(back.witness, batch.witness)
  assert back.layout == json.loads(json.dumps(batch.layout))
  certs = batch.certificates()
  assert [c.upper for c in certs] == batch.upper.tolist()
  assert certs[-1].upper == batch[-1].upper
  assert batch.proves(float(batch.upper.max())).all() and not batch.proves(0.0).any()
  assert np.all(batch.gap >= 1)
  assert "5 boxes" in str(batch) and batch.total_seconds >= batch.compile_seconds >= 0
  assert np.all(batch.seconds > 0)


def test_outputs_selects_the_error(pair):
  f, fq, boxes = pair
  both = qb.certify_batch(f, fq, boxes, method="interval", search=H.search(), progress=False)
  first = qb.certify_batch(f, fq, boxes, method="interval", search=H.search(), outputs=[0], progress=False)
  np.testing.assert_allclose(first.upper, np.maximum(-both.diff_lower[:, 0], both.diff_upper[:, 0]))
  assert np.all(first.upper <= both.upper)


@pytest.mark.parametrize("method", ["auto", "bab", "milp"])
def test_adaptive_methods_are_refused(pair, method):
  f, fq, boxes = pair
  with pytest.raises(ValueError, match="not batched.*qbound.certify once per box"):
    qb.certify_batch(f, fq, boxes, method=method)


def test_budget_below_one_row(pair, buffers_only):
  f, fq, boxes = pair
  with pytest.raises(ValueError, match="too small for this network and method 'crown'"):
    qb.certify_batch(f, fq, boxes, method="crown", memory_budget=1000)


def test_bad_calls(pair):
  f, fq, boxes = pair
  with pytest.raises(ValueError, match="unknown method 'cROWN'"):
    qb.certify_batch(f, fq, boxes, method="cROWN")
  with pytest.raises(ValueError, match=r"boxes have shape \(2,\), read as 2 boxes of shape \(\).*one box per row"):
    qb.certify_batch(f, fq, qb.Box(-jnp.ones(2), jnp.ones(2)), method="interval")
  with pytest.raises(ValueError, match="empty batch"):
    qb.certify_batch(f, fq, qb.Box(jnp.zeros((0, 2)), jnp.zeros((0, 2))), method="interval")
  with pytest.raises(ValueError, match="is empty: lower > upper"):
    qb.certify_batch(f, fq, qb.Box(boxes.upper, boxes.lower), method="interval")
  with pytest.raises(ValueError, match="outputs must be flat indices"):
    qb.certify_batch(f, fq, boxes, method="interval", outputs=[2])
  with pytest.raises(ValueError, match="memory_budget of .* too small: on CPU it includes this process"):
    qb.certify_batch(f, fq, boxes, method="crown", memory_budget=1000)
  with pytest.raises(ValueError, match="memory_budget must be a positive number"):
    qb.certify_batch(f, fq, boxes, method="crown", memory_budget=-1)
  g = lambda x: jnp.concatenate([f(x)[:1] * 2.0, f(x)[1:]])  # not f's layer structure
  with pytest.raises(ValueError, match="same layer structure"):
    qb.certify_batch(f, g, boxes, method="diff")


def test_linf_ball_of_a_batch():
  centres = jnp.array([[0.0, 0.5], [0.99, 0.2]])
  balls = qb.linf_ball(centres, jnp.array([0.1, 0.02])[:, None], clip_lower=0.0, clip_upper=1.0)
  np.testing.assert_allclose(balls.lower, [[0.0, 0.4], [0.97, 0.18]], atol=1e-7)
  np.testing.assert_allclose(balls.upper, [[0.1, 0.6], [1.0, 0.22]], atol=1e-7)
  assert qb.box.validate_boxes(balls).shape == (2, 2)
