"""certify(auto) on staircases with dynamic scales, with ``certify.DIFF_INTERVAL_BESIDE_BAB`` (opt-in),
also runs the differential interval pass beside branch and bound: its bound is among the
certificate's and sound, and it is not run where f_q's scales are static, nor when off (the default)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb

certify_module = importlib.import_module("qbound.certify")


def _quantized_dense(x, w, dynamic):
  """``x @ w`` with x quantized to int8 as qwix computes it: a scale from the input (its zero-scale
  guard included) when ``dynamic``, else a constant one."""
  if dynamic:
    s = jnp.max(jnp.abs(x)) / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
  else:
    s = jnp.float32(2.0 / 127.5)
  c = jnp.round(x / s).astype(jnp.int8)  # saturates at [-128, 127]
  return (c.astype(jnp.float32) @ w) * s


def _pair(dynamic, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  w1, w2 = jax.random.normal(k1, (3, 8)), jax.random.normal(k2, (8, 2))
  b1 = 0.1 * jax.random.normal(k3, (8,))
  f = lambda x: jax.nn.relu(x @ w1 + b1) @ w2  # noqa: E731
  fq = lambda x: _quantized_dense(jax.nn.relu(_quantized_dense(x, w1, dynamic) + b1), w2, dynamic)  # noqa: E731
  return f, fq


def _stages_run(monkeypatch, f, fq, box):
  seen = []
  original = certify_module._diff_output

  def spy(merged, box_, sound, symbolic, *args):
    seen.append(symbolic)
    return original(merged, box_, sound, symbolic, *args)

  monkeypatch.setattr(certify_module, "_diff_output", spy)
  cert = qb.certify(f, fq, box, time_budget=3.0)
  return cert, seen


@pytest.mark.slow  # an opt-in (certify.DIFF_INTERVAL_BESIDE_BAB): 15 s, with the slow tests
def test_dynamic_scales_get_the_differential_interval_bound_and_it_is_sound(monkeypatch):
  monkeypatch.setattr(certify_module, "DIFF_INTERVAL_BESIDE_BAB", True)
  f, fq = _pair(dynamic=True)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  alone = qb.certify(f, fq, box, method="diff-interval")  # (compiles its steps: the short call below has them)
  cert, seen = _stages_run(monkeypatch, f, fq, box)
  assert False in seen  # the interval pass ran (symbolic=False)
  assert cert.bounds["diff-interval"] == pytest.approx(alone.upper)
  xs = jax.random.uniform(jax.random.key(2), (20000, 3), minval=-1.0, maxval=1.0)
  errors = np.abs(np.asarray(jax.vmap(f)(xs)) - np.asarray(jax.vmap(fq)(xs))).max()
  assert errors <= cert.bounds["diff-interval"]
  assert cert.lower <= cert.upper <= cert.bounds["diff-interval"]
  assert errors <= cert.upper


@pytest.mark.slow
@pytest.mark.parametrize("flag", [True, False])
def test_not_on_static_scales_nor_when_turned_off(monkeypatch, flag):
  monkeypatch.setattr(certify_module, "DIFF_INTERVAL_BESIDE_BAB", flag)
  f, fq = _pair(dynamic=not flag)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  cert, seen = _stages_run(monkeypatch, f, fq, box)
  assert False not in seen
  assert "diff-interval" not in cert.bounds
