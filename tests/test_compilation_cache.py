"""``import qbound`` keeps compiled steps across processes (JAX's persistent compilation cache)."""

import json
import os
import subprocess
import sys

import pytest

from qbound import _compilation_cache

CERTIFY = """
import json, sys, time
import jax
import jax.numpy as jnp
import qbound as qb
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kwargs: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
W = jnp.array([[1.0, -2.0], [0.5, 1.5]])
f = lambda x: jnp.tanh(x @ W) @ W
fq = lambda x: jnp.tanh(x @ jnp.round(W * 4) / 4) @ W
cert = qb.certify(f, fq, qb.Box(-jnp.ones(2), jnp.ones(2)), method="crown")
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "upper": cert.upper, "hits": len(hits)}))
"""

# Where the cache goes is decided at import (qbound creates its directory there): a process that
# compiles one small program is enough to see it.
ONE_PROGRAM = """
import json
import jax
import qbound
jax.jit(lambda x: x * 2.0 + 1.0)(1.0).block_until_ready()
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir}))
"""


def run(environ, script=CERTIFY):
  env = {k: v for k, v in os.environ.items() if k not in ("QBOUND_JAX_CACHE", "JAX_COMPILATION_CACHE_DIR")}
  env.update(environ)
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_directory_choices(tmp_path):
  assert _compilation_cache.directory({"QBOUND_JAX_CACHE": "0"}) is None
  assert _compilation_cache.directory({"QBOUND_JAX_CACHE": ""}) is None
  assert _compilation_cache.directory({"QBOUND_JAX_CACHE": str(tmp_path)}) == tmp_path
  assert _compilation_cache.directory({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "qbound" / "jax"


@pytest.mark.parametrize("opt_out", ["0", ""])
def test_opt_out(tmp_path, opt_out):
  assert run({"XDG_CACHE_HOME": str(tmp_path), "QBOUND_JAX_CACHE": opt_out}, ONE_PROGRAM)["dir"] is None
  assert not (tmp_path / "qbound").exists()


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_on_by_default_and_reused_by_the_next_process(tmp_path):
  first = run({"XDG_CACHE_HOME": str(tmp_path)})
  cache = tmp_path / "qbound" / "jax"
  assert first["dir"] == str(cache)
  entries = {p.name for p in cache.iterdir()}
  assert entries, "the first process wrote no compiled step to the cache"
  second = run({"XDG_CACHE_HOME": str(tmp_path)})
  assert second["upper"] == first["upper"]
  # The second process read the programs the first one compiled (the first may hit its own
  # entries too, where a step is compiled again under another jit wrapper).
  assert second["hits"] > first["hits"]


def test_users_own_cache_directory_wins(tmp_path):
  mine = tmp_path / "mine"
  assert run({"XDG_CACHE_HOME": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": str(mine)}, ONE_PROGRAM)["dir"] == str(mine)
  assert not (tmp_path / "qbound").exists()
