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
