"""Tests of qbound.sharding and of the data-parallel layout: one device and eight host devices give
the same certificates, and the work is really split over the eight.

Eight host devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is
imported, so those runs are subprocesses (``tests/multidevice_check.py``), one per device count,
run side by side.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound import sharding

HERE = pathlib.Path(__file__).resolve().parent


def run_devices(counts, *args, timeout=900):
  """``{count: json output}`` of multidevice_check.py, one subprocess per device count, concurrently."""
  procs = {}
  for count in counts:
    # The suite's own XLA flags (tests/conftest.py) kept, the device count added.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    env = dict(os.environ, XLA_FLAGS=flags,
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    procs[count] = subprocess.Popen([sys.executable, str(HERE / "multidevice_check.py"), *args], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
  out = {}
  for count, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    out[count] = json.loads(stdout)
  return out


def compare(one, eight):
  assert one["devices"] == 1 and eight["devices"] == 8
  # The same certificates for all 64 boxes.
  np.testing.assert_allclose(eight["upper"], one["upper"], rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(eight["lower"], one["lower"], rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(eight["witness"], one["witness"], atol=1e-4)
  # ... and the boxes were really spread: 8 per device, as the input arrays' shards say and as the
  # devices themselves report (the mesh position each box was bounded at).
  assert one["layout"]["shards"] == {"0": 64}
  assert eight["layout"]["chunk"] == 64
  assert sorted(eight["layout"]["shards"].values()) == [8] * 8
  assert np.bincount(eight["layout"]["device_of_box"], minlength=8).tolist() == [8] * 8
  # Branch and bound: the same run (same pieces, same bounds), each batch of pieces spread.
  assert (eight["bab"]["pieces"], eight["bab"]["stopped"]) == (one["bab"]["pieces"], one["bab"]["stopped"])
  for k in ("upper", "lower"):
    assert eight["bab"][k] == pytest.approx(one["bab"][k], rel=1e-6), k
  batch = 256  # qbound.bounds.bab.default_batch_size of this small net
  assert one["bab"]["layout"] == {"0": batch}
  assert sorted(eight["bab"]["layout"].values()) == [batch // 8] * 8
  assert eight["sampling"]["value"] == pytest.approx(one["sampling"]["value"], rel=1e-6)


def test_one_and_eight_devices_agree():
  """64 boxes (CROWN) and a branch-and-bound run (CROWN on a merged net) on 1 and on 8 devices."""
  runs = run_devices([1, 8], "--method", "crown")
  compare(runs[1], runs[8])


@pytest.mark.slow
def test_one_and_eight_devices_agree_differential():
  """The same with the differential bounds (slower to compile)."""
  runs = run_devices([1, 8], "--method", "diff", "--bab-paired")
  compare(runs[1], runs[8])


def test_mesh_helpers():
  mesh = sharding.default_mesh()
  assert mesh.axis_names == (sharding.AXIS,) and sharding.size(mesh) == len(jax.devices())
  assert sharding.resolve_mesh(mesh) is mesh
  with pytest.raises(ValueError, match="either mesh or devices"):
    sharding.resolve_mesh(mesh, jax.devices())
  with pytest.raises(ValueError, match="exactly one axis"):
    sharding.resolve_mesh(jax.sharding.Mesh(np.asarray(jax.devices()), ("other",)))
  with pytest.raises(ValueError, match="devices is empty"):
    sharding.default_mesh([])
  assert sharding.padded_size(5, None) == 5
  np.testing.assert_array_equal(sharding.pad_rows(np.arange(3), 5), [0, 1, 2, 2, 2])
  x = sharding.put_batch(np.zeros((sharding.padded_size(3, mesh), 2), np.float32), mesh)
  assert sum(sharding.layout(x).values()) == x.shape[0]
  ints = sharding.put_batch(np.arange(len(jax.devices()), dtype=np.int64), mesh)
  assert ints.dtype == jnp.int32  # canonicalised: no int64 without jax_enable_x64
  np.testing.assert_array_equal(sharding.gather(ints), np.arange(len(jax.devices())))


def test_a_mesh_with_explicit_axes_is_taken_as_auto():
  """jax.make_mesh gives Explicit axes, on which the sparse passes' mapped steps were refused inside
  JAX; qbound takes the same devices with Auto axes (it places its arrays itself)."""
  mesh = jax.make_mesh((1,), (sharding.AXIS,))
  resolved = sharding.resolve_mesh(mesh)
  assert all(kind == jax.sharding.AxisType.Auto for kind in resolved.axis_types)
  assert list(resolved.devices.flat) == list(mesh.devices.flat) and resolved.axis_names == mesh.axis_names


def test_certify_batch_on_a_given_device_list():
  f, fq, _, _ = H.random_pair(0, (2, (8,), 2), bits=4)
  boxes = qb.linf_ball(jnp.zeros((3, 2)), 0.5)
  batch = qb.certify_batch(f, fq, boxes, method="interval", devices=jax.devices()[:1], search=H.search(),
                           progress=False)
  assert batch.layout["devices"] == 1 and set(batch.layout["device_of_box"]) == {0}


def test_device_programs_are_float32_only():
  """Nothing that runs on the devices needs float64 (TPUs have none): the compiled bound and search
  programs of certify_batch hold no f64 value. Only the witness's re-evaluation uses float64, on
  the host CPU (qbound.attack.exact_error)."""
  from qbound.batch import _bounds_chunk, _search_chunk

  f, fq, _, _ = H.random_pair(0, (2, (8,), 2), bits=4)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  mesh = sharding.default_mesh()
  n = sharding.padded_size(2, mesh)
  lo, hi = jnp.zeros((n, 2)), jnp.ones((n, 2))
  keys = jax.random.key_data(jax.random.split(jax.random.key(0), n))
  for method in ("interval", "crown", "diff", "diff-interval", "alpha"):
    fg, qg = (merged.f_graph, merged.fq_graph) if method != "crown" and method != "interval" else (None, None)
    text = _bounds_chunk.lower(fg, qg, merged.graph, lo, hi, method=method, sound=True, row_chunk=None,
                               alpha_steps=2, mesh=mesh).as_text()
    assert "f64" not in text, method
  text = _search_chunk.lower(merged.graph, lo, hi, keys, search=H.search(), impl="threefry2x32", mesh=mesh).as_text()
  assert "f64" not in text


def test_exact_error_runs_on_the_host_cpu():
  """The float64 witness evaluation works with the weights laid out on a mesh, and gives numpy's value."""
  f, fq, params, qparams = H.random_pair(0, (2, (8,), 2), bits=4)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  graph = qb.merge(f, fq, box).graph
  placed = sharding.put_replicated(graph, sharding.default_mesh())
  xs = np.random.default_rng(0).uniform(-1, 1, (4, 2))
  one = np.stack([qb.attack.exact_error(placed, x) for x in xs])
  many = qb.attack.exact_errors(placed, xs)
  expected = H.eval64(graph, xs)
  np.testing.assert_allclose(one, expected, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(many, expected, rtol=1e-12, atol=1e-15)
  assert one.dtype == np.float64
