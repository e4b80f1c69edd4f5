"""qb.compression.search: per-layer bit widths chosen by what can be proven."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb
from helpers import SHAPES, mlp


@pytest.fixture(scope="module")
def setting():
  n_in, hidden, n_out = SHAPES[2]
  model = mlp(tuple(hidden), n_out)
  params = model.init(jax.random.key(3), jnp.zeros(n_in))
  centres = jax.random.uniform(jax.random.key(4), (6, n_in), minval=-1, maxval=1)
  return model, params, qb.linf_ball(centres, 0.05)


@pytest.mark.slow  # 14 s
def test_plan_meets_the_budget_and_beats_uniform(setting):
  model, params, boxes = setting
  widest = qb.compression.search(params, model.apply, boxes, epsilon=1e9, widths=(8,), progress=False)
  epsilon = 4 * widest.certified
  plan = qb.compression.search(params, model.apply, boxes, epsilon=epsilon, progress=False)
  assert plan.certified <= epsilon
  feasible = [c for c in plan.uniform if c.certified <= epsilon]
  assert feasible and plan.bytes <= min(c.bytes for c in feasible)
  # Re-certified independently: the plan's parameters, every box, the same method.
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, plan.params)
  again = qb.certify_batch(f, fq, boxes, method="diff", progress=False)
  assert float(np.max(again.upper)) <= epsilon
  # Sampled errors stay below the certificate.
  xs = jax.random.uniform(jax.random.key(5), (200, *boxes.lower.shape[1:]), minval=-1, maxval=1)
  inside = jnp.clip(xs[:, None], boxes.lower[None], boxes.upper[None]).reshape(-1, xs.shape[-1])
  errors = jnp.abs(jax.vmap(f)(inside) - jax.vmap(fq)(inside))
  assert float(jnp.max(errors)) <= plan.certified
  assert set(plan.bits) == {"params/Dense_0/kernel", "params/Dense_1/kernel", "params/Dense_2/kernel"}


def test_impossible_budget_is_refused(setting):
  model, params, boxes = setting
  with pytest.raises(ValueError, match="no assignment meets epsilon"):
    qb.compression.search(params, model.apply, boxes, epsilon=0.0, widths=(3, 2), progress=False)


def test_storage_counts_bits_and_scales():
  params = {"params": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}}
  assert qb.compression.storage_bytes(params, {}) == (12 + 3) * 4
  assert qb.compression.storage_bytes(params, {"params/kernel": 4}) == (12 * 4 + 32 + 3 * 32) // 8
  assert qb.compression.storage_bytes(params, {"params/kernel": 4}, per_channel=True) == (12 * 4 + 3 * 32 + 3 * 32) // 8


def _sampled_error(f, fq, boxes, key, n=200):
  """The largest error reached at random points of the boxes (a lower bound on the true maximum)."""
  u = jax.random.uniform(key, (n, *boxes.lower.shape))
  xs = (boxes.lower + u * (boxes.upper - boxes.lower)).reshape(-1, boxes.lower.shape[-1])
  return float(jnp.max(jnp.abs(jax.vmap(f)(xs) - jax.vmap(fq)(xs))))


@pytest.mark.parametrize("how", ["attribution", "sensitivity"])
def test_ordered_search_meets_the_budget(setting, how):
  model, params, boxes = setting
  widest = qb.compression.search(params, model.apply, boxes, epsilon=1e9, widths=(8,), progress=False)
  epsilon = 4 * widest.certified
  if how == "attribution":
    scores = qb.compression.attribution(params, model.apply, boxes, 4)
  else:
    scores = qb.compression.sensitivity(params, model.apply, boxes.center, 4)
  order = sorted(scores, key=scores.get)
  plan = qb.compression.search(params, model.apply, boxes, epsilon=epsilon, order=order, progress=False)
  # Never an assignment whose certificate fails: re-certified here, independently of the plan.
  f, fq = functools.partial(model.apply, params), functools.partial(model.apply, plan.params)
  assert qb.compression.certified_error(f, fq, boxes) <= epsilon
  assert _sampled_error(f, fq, boxes, jax.random.key(7)) <= plan.certified
  # Every step it took met the budget, and it went below the best uniform width somewhere or stopped
  # at a step that failed.
  best_uniform = min(c.bytes for c in plan.uniform if c.certified <= epsilon)
  assert plan.bytes <= best_uniform
  assert plan.bytes < best_uniform or any(c.certified > epsilon for c in plan.steps)


def test_search_rejects_a_bad_order(setting):
  model, params, boxes = setting
  with pytest.raises(ValueError, match="which `where` does not select"):
    qb.compression.search(params, model.apply, boxes, epsilon=1e9, order=["params/Dense_9/kernel"], progress=False)
  with pytest.raises(ValueError, match="more than once"):
    qb.compression.search(params, model.apply, boxes, epsilon=1e9,
                          order=["params/Dense_0/kernel", "params/Dense_0/kernel"], progress=False)


def test_attribution_ranks_the_coarsest_layer_first_and_is_sound(setting):
  model, params, boxes = setting
  bits = {"params/Dense_0/kernel": 12, "params/Dense_1/kernel": 2, "params/Dense_2/kernel": 12}
  a = qb.compression.attribution(params, model.apply, boxes, bits)
  assert list(a) == list(bits)
  assert max(a, key=a.get) == "params/Dense_1/kernel"
  f = functools.partial(model.apply, params)
  for name, width in bits.items():
    fq = functools.partial(model.apply, qb.compression.quantize_layers(params, {name: width}))
    assert 0 <= _sampled_error(f, fq, boxes, jax.random.key(8)) <= a[name]
  # Narrower widths of the same layer are attributed more error.
  wide = qb.compression.attribution(params, model.apply, boxes, {"params/Dense_1/kernel": 8})
  assert wide["params/Dense_1/kernel"] < a["params/Dense_1/kernel"]


def test_sensitivity_ranks_the_coarsest_layer_first(setting):
  model, params, boxes = setting
  bits = {"params/Dense_0/kernel": 12, "params/Dense_1/kernel": 2, "params/Dense_2/kernel": 12}
  s = qb.compression.sensitivity(params, model.apply, boxes.center, bits)
  assert max(s, key=s.get) == "params/Dense_1/kernel" and all(v >= 0 for v in s.values())


def test_attribution_and_sensitivity_reject_bad_input(setting):
  model, params, boxes = setting
  with pytest.raises(ValueError, match="must map some of the layers"):
    qb.compression.attribution(params, model.apply, boxes, {"params/nope/kernel": 4})
  with pytest.raises(ValueError, match="bits"):
    qb.compression.sensitivity(params, model.apply, boxes.center, 1)
  with pytest.raises(ValueError, match="at least one input"):
    qb.compression.sensitivity(params, model.apply, jnp.zeros((0, 5)), 4)
