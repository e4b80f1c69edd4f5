"""Tests of qbound.memory: row blocks change no bound, the footprint estimate bounds what XLA
allocates, and the plan follows the budget."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound import graph as G
from qbound import memory
from qbound.bounds.crown import crown_bounds
from qbound.bounds.diff import diff_bounds


class SmallCNN(nn.Module):
  """8x8x3 -> conv 8 -> conv 8 (stride 2) -> dense 10: wide layers for few parameters."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape(-1))


@pytest.fixture(scope="module")
def small_pair():
  f, fq, _, _ = H.random_pair(0, (2, (8,), 2), bits=4)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  return qb.merge(f, fq, box), box


@pytest.mark.parametrize("row_chunk", [3, 1000])
def test_row_blocks_change_no_bound(small_pair, row_chunk):
  """Blocks of 3 rows (the last block padded) and one block larger than all rows."""
  merged, box = small_pair
  full = crown_bounds(merged.graph, box, None, True)
  blocked = crown_bounds(merged.graph, box, None, True, row_chunk)
  for (a, b), (c, d) in zip(full, blocked):
    np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(d, b, rtol=1e-6, atol=1e-7)


def test_row_blocks_change_no_differential_bound(small_pair):
  merged, box = small_pair
  _, _, d_full = diff_bounds(merged.f_graph, merged.fq_graph, box, None, True, True)
  _, _, d_blocked = diff_bounds(merged.f_graph, merged.fq_graph, box, None, True, True, 3)
  out = merged.f_graph.output
  np.testing.assert_allclose(d_blocked[out][0], d_full[out][0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(d_blocked[out][1], d_full[out][1], rtol=1e-6, atol=1e-7)


def test_backward_live_counts_waiting_coefficients():
  # x(4) -> affine(6) -> relu(6) -> affine(3), and the same graph with a residual branch.
  chain = G.Graph(nodes=(G.Node("input", (), (4,)), G.Node("affine", (0,), (6,)), G.Node("relu", (1,), (6,)),
                         G.Node("affine", (2,), (3,))), output=3)
  assert memory.backward_live(chain, 3) == 6 + 6   # through the relu: its output's and its input's
  assert memory.backward_live(chain, 1) == 6 + 4
  residual = G.Graph(nodes=chain.nodes + (G.Node("add", (3, 1), (3,), attrs=(1, 1)),), output=4)
  # Walking back from the add: node 1's coefficients wait while node 3 is transposed into node 2's.
  assert memory.backward_live(residual, 4) == 6 + 3 + 6


def test_plan_follows_the_budget(small_pair):
  merged, _ = small_pair
  search = qb.Search(samples=8, restarts=2, steps=5)
  free = memory.plan(merged, "crown", budget=math.inf, boxes=100, devices=8, search=search)
  assert free.row_chunk is None and free.box_chunk == 13  # ceil(100 / 8)
  big = memory.plan(merged, "crown", budget=2**30, boxes=5, search=search)
  assert big.row_chunk is None and big.box_chunk == 5 and big.estimate <= 2**30
  # Room for 4 boxes: 10 boxes go in 3 equal chunks of 4 (the last padded by 2), not 4 + 4 + 2.
  rows = memory.max_rows(merged, "crown")
  one_box = max(big.per_box + rows * big.per_row, big.search_per_box)
  four = memory.plan(merged, "crown", budget=big.fixed + 4 * one_box + 1, boxes=10, search=search)
  assert four.box_chunk == 4
  seven = memory.plan(merged, "crown", budget=four.budget, boxes=7, search=search)
  assert seven.box_chunk == 4  # 2 chunks: 4 + 3
  room = big.fixed + big.per_box + 4 * big.per_row
  tight = memory.plan(merged, "crown", budget=room, boxes=5, search=search)
  assert tight.box_chunk == 1 and tight.row_chunk == 4 and tight.estimate <= room
  with pytest.raises(ValueError, match="too small"):
    memory.plan(merged, "crown", budget=big.fixed, search=search)
  with pytest.raises(ValueError, match="positive number of bytes"):
    memory.plan(merged, "crown", budget=0)
  with pytest.raises(ValueError, match="no memory estimate"):
    memory.plan(merged, "bab")
  assert memory.shrink(big, 16).box_chunk == 2
  assert memory.shrink(tight, 16).row_chunk == 2
  assert memory.shrink(memory.shrink(tight, 16), 16).row_chunk == 1
  assert memory.shrink(dataclass_replace(tight, row_chunk=1), 16) is None
  assert memory.default_budget() > 0
  assert memory.default_row_chunk(16) is None and memory.default_row_chunk(2048) == 1024
  cpu = jax.devices("cpu")
  assert memory.buffer_budget(math.inf, cpu) == math.inf
  expected = 2**33 - (memory.process_bytes() + memory.CPU_ALLOWANCE) / len(cpu)
  assert memory.buffer_budget(2**33, cpu) == pytest.approx(expected, abs=2**26)


def dataclass_replace(p, **kw):
  import dataclasses

  return dataclasses.replace(p, **kw)


@pytest.mark.slow  # 13 s
def test_estimate_bounds_what_xla_allocates():
  """A CNN whose backward rows take most of the memory: compiled with the row blocks a budget forces,
  and with the default two blocks, XLA's own count of the buffers stays within the estimate."""
  from qbound.batch import _bounds_chunk

  model = SmallCNN()
  params = model.init(jax.random.key(0), jnp.zeros((8, 8, 3)))
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=8))
  box = qb.Box(jnp.zeros((8, 8, 3)), jnp.full((8, 8, 3), 0.01))
  merged = qb.merge(f, fq, box)
  search = qb.Search(samples=8, restarts=2, steps=5)
  p = memory.plan(merged, "crown", budget=math.inf, search=search)
  budget = p.fixed + p.per_box + 32 * p.per_row
  tight = memory.plan(merged, "crown", budget=budget, boxes=2, search=search)
  assert (tight.box_chunk, tight.row_chunk) == (1, 32) and tight.estimate <= budget
  lo = np.zeros((1, 8, 8, 3), np.float32)
  for plan in (tight, p):
    compiled = _bounds_chunk.lower(None, None, merged.graph, lo, lo, method="crown", sound=True,
                                   row_chunk=plan.row_chunk, alpha_steps=0, mesh=qb.sharding.default_mesh()).compile()
    xla = memory.compiled_bytes(compiled)
    rows = plan.row_chunk or memory.max_rows(merged, "crown")
    assert xla is None or xla <= p.fixed + p.per_box + rows * p.per_row, (plan, xla)
