"""qbound._map_limit: a process near the kernel's limit on memory maps clears JAX's compilation
caches (with a warning) before certify compiles more, instead of crashing in XLA's compiler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import qbound as qb
from qbound import _map_limit


def test_counts_this_process_maps(monkeypatch):
  monkeypatch.setattr(_map_limit, "MIN_INTERVAL", 0.0)
  used, limit = _map_limit.maps_in_use(), _map_limit.map_limit()
  if used is None or limit is None:
    pytest.skip("no /proc on this system: the guard does nothing here")
  assert 0 < used < limit
  assert not _map_limit.release_if_near_limit()


@pytest.mark.slow  # (12 s; the default suite sits near CI's 15 minutes)
def test_near_the_limit_the_caches_are_cleared_with_a_warning(monkeypatch):
  monkeypatch.setattr(_map_limit, "MIN_INTERVAL", 0.0)
  square = jax.jit(lambda x: x * x)
  square(jnp.ones(3))
  assert square._cache_size() == 1
  monkeypatch.setattr(_map_limit, "map_limit", lambda: 1000)
  monkeypatch.setattr(_map_limit, "maps_in_use", lambda: 700)
  assert not _map_limit.release_if_near_limit()  # 70% < 75%
  assert square._cache_size() == 1
  monkeypatch.setattr(_map_limit, "maps_in_use", lambda: 800)
  with pytest.warns(RuntimeWarning, match="vm.max_map_count"):
    assert _map_limit.release_if_near_limit()
  assert square._cache_size() == 0
  monkeypatch.setattr(_map_limit, "MIN_INTERVAL", 3600.0)  # read a moment ago: not again yet
  assert not _map_limit.release_if_near_limit()
  monkeypatch.setattr(_map_limit, "MIN_INTERVAL", 0.0)
  monkeypatch.setattr(_map_limit, "map_limit", lambda: None)  # no /proc: nothing to do
  assert not _map_limit.release_if_near_limit()


def test_certify_releases_before_it_compiles(monkeypatch):
  calls = []
  monkeypatch.setattr(_map_limit, "release_if_near_limit", lambda *a, **k: calls.append(1) or False)
  w = jnp.array([[1.0, -1.0]])
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  qb.certify(lambda x: x @ w.T, lambda x: x @ (0.5 * w).T, box, method="interval")
  assert calls == [1]
