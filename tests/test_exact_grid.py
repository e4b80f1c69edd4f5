"""qbound.exact.grid: the maximal error cell by cell where f_q rounds its input first."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qbound as qb
from qbound.bounds.interval import interval_bounds
from qbound.exact import cell_bounds, cells, forms, grid
import helpers as H


def _rounded_mlp(key, inputs=3, width=8, step=1 / 8, hidden_step=1 / 4):
  """A ReLU MLP f, and f_q: the same with its input and hidden activations fake-quantized
  (``round(x / s) * s`` with static steps), the shape of AQT's and qwix's static int8 layers."""
  k1, k2, k3 = jax.random.split(key, 3)
  w1 = jax.random.normal(k1, (inputs, width)) / np.sqrt(inputs)
  w2 = jax.random.normal(k2, (width, 2)) / np.sqrt(width)
  b1 = 0.1 * jax.random.normal(k3, (width,))

  def f(x):
    return jax.nn.relu(x @ w1 + b1) @ w2

  def fq(x):
    xq = jnp.clip(jnp.round(x / step), -127, 127) * step
    h = jax.nn.relu(xq @ w1 + b1)
    return (jnp.round(h / hidden_step) * hidden_step) @ w2

  return f, fq


def _sampled_max(merged, box, edges, n=5000, seed=0):
  """The largest float64 error over uniform samples and points just beside the cells' ties."""
  rng = np.random.default_rng(seed)
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  xs = lo + rng.uniform(size=(n, lo.size)) * (hi - lo)
  # Points a hair from a tie on one entry (where f_q jumps), the others uniform.
  near = lo + rng.uniform(size=(n, lo.size)) * (hi - lo)
  for row in near:
    i = rng.integers(lo.size)
    e = edges[i][rng.integers(len(edges[i]))]
    row[i] = np.clip(e + rng.choice([-1e-7, 1e-7]), lo[i], hi[i])
  points = np.concatenate([xs, near]).astype(np.float32)
  return float(np.max(np.abs(H.eval64(merged, points))))


def test_grid_error_is_exact_when_f_is_linear_on_each_cell():
  f = lambda x: jnp.sum(jax.nn.relu(x))  # noqa: E731
  fq = lambda x: jnp.sum(jax.nn.relu(jnp.round(x * 4) / 4))  # noqa: E731
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  res = grid.grid_error(qb.merge(f, fq, box), box)
  assert res.cells == 9 * 9
  # Just below x = 1/8 per entry (rounded to 0) the error is 1/8 + 1/8: the sup is 1/4.
  assert 0.2499 <= res.lower <= 0.25 <= res.upper < 0.25 + 1e-4


@pytest.mark.parametrize("seed", [0, 1])
def test_grid_error_is_sound_and_tight_on_rounded_mlps(seed):
  f, fq = _rounded_mlp(jax.random.key(seed))
  box = qb.Box(jnp.array([-0.3, 0.1, -0.5]), jnp.array([0.2, 0.6, 0.0]))
  merged = qb.merge(f, fq, box)
  res = grid.grid_error(merged, box)
  assert res is not None and res.cells == 5 * 5 * 5  # steps of 1/8 over widths of 1/2
  sampled = _sampled_max(merged, box, cells.input_cells(merged.fq_graph, box))
  assert sampled <= res.upper
  assert res.lower <= res.upper <= 1.1 * res.lower
  # The reached error is the error at the witness (float64).
  assert res.lower == pytest.approx(float(np.max(np.abs(H.eval64(merged, res.witness[None])))), rel=1e-9)


def _brute_force_max(merged, box, edges, per_cell=3):
  """The largest float64 error over a lattice of points in every cell (its corners inset by 1e-6
  of the cell, and its centre): the grid's bound must cover every one of them."""
  axes = []
  for e in edges:
    lo, hi = e[:-1], e[1:]
    inset = 1e-6 * (hi - lo)
    axes.append(np.concatenate([lo + inset + t * (hi - lo - 2 * inset) for t in np.linspace(0, 1, per_cell)]))
  points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(edges)).astype(np.float32)
  return float(np.max(np.abs(H.eval64(merged, points))))


@settings(max_examples=6)
@given(seed=st.integers(0, 2 ** 16), block=st.sampled_from([8, 27, 64]), gap=st.sampled_from([0.0, 0.3]))
def test_grid_refined_over_smaller_boxes_is_sound(seed, block, gap):
  # Few blocks of many cells: the cells above the threshold are bounded again over half a block, a
  # quarter, ..., the cell itself. Every level must stay above the error at every point of the box.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(grid, "MAX_BLOCKS", block)
    _check_refined_grid(seed, block, gap)


def _check_refined_grid(seed, block, gap):
  rng = np.random.default_rng(seed)
  f, fq = _rounded_mlp(jax.random.key(seed))
  lo = rng.uniform(-1, 0.3, 3).astype(np.float32)
  box = qb.Box(jnp.asarray(lo), jnp.asarray(lo + np.float32(0.7)))
  merged = qb.merge(f, fq, box)
  res = grid.grid_error(merged, box, refine_gap=gap)
  edges = cells.input_cells(merged.fq_graph, box)
  assert res is not None and res.blocks <= block and res.cells > res.blocks
  assert max(_brute_force_max(merged, box, edges), _sampled_max(merged, box, edges, n=2000, seed=seed)) <= res.upper
  assert res.lower <= res.upper
  assert res.lower == pytest.approx(float(np.max(np.abs(H.eval64(merged, res.witness[None])))), rel=1e-9)


def test_first_pass_bounds_every_cell_against_brute_force():
  # The first pass alone (no refinement to hide a bound too small): each cell's bound must cover
  # the float64 error at points inside that cell (a 3^3 lattice from its corners inset by 1e-6),
  # with blocks cut short at the grid's end (7 and 6 cells a side in blocks of 4) and chunks padded
  # to whole groups of blocks (8 blocks in groups of 3). Seed 1 has a cell 1e-4 wide.
  _check_first_pass(seed=1, max_blocks=8, group=3)


@pytest.mark.slow  # 25 s at load 10 (a compilation per example)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2 ** 16), max_blocks=st.sampled_from([1, 8, 27]), group=st.sampled_from([1, 2, 3]))
def test_first_pass_bounds_every_cell_on_random_grids(seed, max_blocks, group):
  _check_first_pass(seed, max_blocks, group)


def _check_first_pass(seed, max_blocks, group):
  rng = np.random.default_rng(seed)
  f, fq = _rounded_mlp(jax.random.key(seed))
  lo = rng.uniform(-1, 0.3, 3).astype(np.float32)
  box = qb.Box(jnp.asarray(lo), jnp.asarray(lo + np.float32(rng.uniform(0.3, 0.7))))
  merged = qb.merge(f, fq, box)
  edges = cells.input_cells(merged.fq_graph, box)
  q_bounds = interval_bounds(merged.fq_graph, box, True)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(grid, "MAX_BLOCKS", max_blocks)
    layout = grid._Grid(merged.f_graph, merged.fq_graph, box, edges, True, q_bounds)  # noqa: SLF001
  k = layout.n_blocks
  b_lo, b_hi = layout.block_boxes(k)
  value, lam = forms.linear_bounds(merged.f_graph, b_lo, b_hi)
  got = np.asarray(cell_bounds.chunk_bounds(
      merged.fq_graph, layout.q_err, layout.tables, 0, value, lam, b_lo, b_hi, k=k, counts=layout.counts,
      per=layout.per, blocks_per=layout.blocks_per, group_cells=group * layout.cells_per_block), np.float64)
  assert got.shape == (k * layout.cells_per_block,)
  positions = np.arange(got.size)
  idx = layout.indices(positions)
  t = np.linspace(0, 1, 3)
  corners = np.stack(np.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3)  # 27 points per cell
  c_lo = np.stack([edges[i][idx[:, i]] for i in range(3)], -1)
  c_hi = np.stack([edges[i][idx[:, i] + 1] for i in range(3)], -1)
  inset = 1e-6 * (c_hi - c_lo)
  pts = ((c_lo + inset)[:, None] + corners[None] * (c_hi - c_lo - 2 * inset)[:, None]).astype(np.float32)
  # A point of a narrow cell may round onto a tie or past it in float32 (then a neighbour's f_q
  # holds there): only the points strictly inside count.
  inside = np.all((pts > c_lo[:, None]) & (pts < c_hi[:, None]), axis=-1)
  errs = np.abs(H.eval64(merged, pts.reshape(-1, 3))).reshape(*inside.shape, -1).max(axis=-1)
  errs = np.where(inside, errs, 0.0).max(axis=1)
  assert inside.any(axis=1).mean() > 0.8 and np.all(errs <= got), (errs - got).max()
  # Tight where f_q's value is sure (f is nearly linear on a block of a few cells).
  finite = np.isfinite(got)
  assert finite.mean() > 0.9 and np.median(got[finite] - errs[finite]) < 0.2


def test_grid_refinement_gets_the_one_cell_bounds(monkeypatch):
  # With refine_gap 0 every cell above the reached error ends bounded on its own: the bound is the
  # one of 5^3 single-cell refinements, whatever the blocks.
  f, fq = _rounded_mlp(jax.random.key(0))
  box = qb.Box(jnp.array([-0.3, 0.1, -0.5]), jnp.array([0.2, 0.6, 0.0]))
  merged = qb.merge(f, fq, box)
  one_cell = grid.grid_error(merged, box, refine_gap=0.0)  # 125 blocks of one cell
  monkeypatch.setattr(grid, "MAX_BLOCKS", 8)
  coarse = grid.grid_error(merged, box, refine_gap=0.0)
  assert coarse.blocks == 8 and one_cell.blocks == 125
  assert coarse.upper == pytest.approx(one_cell.upper, rel=1e-9)


def test_grid_stopped_after_its_first_pass_keeps_a_proven_bound(monkeypatch):
  # Stopped once every cell has its first bound: a bound over the whole box, above every error.
  monkeypatch.setattr(grid, "MAX_BLOCKS", 8)
  f, fq = _rounded_mlp(jax.random.key(1))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  chunks = []
  chunk = grid.chunk_bounds
  monkeypatch.setattr(grid, "chunk_bounds", lambda *a, **k: chunks.append(1) or chunk(*a, **k))
  stopped = grid.grid_error(merged, box, refine_gap=0.0, stop=lambda: bool(chunks))
  full = grid.grid_error(merged, box, refine_gap=0.0)
  assert stopped is not None and np.isfinite(stopped.upper) and stopped.refined < full.refined
  assert full.upper <= stopped.upper
  edges = cells.input_cells(merged.fq_graph, box)
  assert _sampled_max(merged, box, edges) <= full.upper


def test_grid_starts_from_the_inputs_it_is_given():
  f, fq = _rounded_mlp(jax.random.key(0))
  box = qb.Box(jnp.array([-0.3, 0.1, -0.5]), jnp.array([0.2, 0.6, 0.0]))
  merged = qb.merge(f, fq, box)
  res = grid.grid_error(merged, box)
  # Given its own witness, the reached error is at least the error there; the bound is unchanged.
  again = grid.grid_error(merged, box, reached=res.witness[None])
  assert again.lower >= res.lower and again.upper <= (1 + 0.02) * again.lower + 1e-9


def test_grid_error_declines_networks_it_cannot_enumerate():
  f, fq = _rounded_mlp(jax.random.key(0))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  assert grid.grid_error(qb.merge(f, fq, box), box, max_cells=100) is None  # 17^3 cells
  # Weights quantized, the input not rounded: f_q is not constant on any grid.
  w = jax.random.normal(jax.random.key(1), (3, 2))
  plain = lambda x: jax.nn.relu(x @ w)  # noqa: E731
  coarse = lambda x: jax.nn.relu(x @ (jnp.round(w * 8) / 8))  # noqa: E731
  assert grid.grid_error(qb.merge(plain, coarse, box), box) is None
  # A rounding of a sum of inputs is no grid of the input.
  mixed = lambda x: jnp.round(x[0] + x[1]) * x[2]  # noqa: E731
  assert cells.input_cells(qb.trace(mixed, jnp.zeros(3)), box) is None


def test_grid_error_stops_at_its_deadline():
  f, fq = _rounded_mlp(jax.random.key(0))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  assert grid.grid_error(qb.merge(f, fq, box), box, deadline=0.0) is None


def test_ties_at_the_box_ends_are_cells_of_their_own():
  # x / 0.5 has a tie at x = 0.25: a box ending there must bound both sides of the jump.
  f = lambda x: 2 * x[0]  # noqa: E731
  fq = lambda x: 2 * jnp.round(x[0] / 0.5) * 0.5  # noqa: E731
  box = qb.Box(jnp.array([0.25]), jnp.array([0.5]))
  res = grid.grid_error(qb.merge(f, fq, box), box)
  # At x = 0.25 round(0.5) = 0 (half to even): the error 0.5 is reached there, and the sup is 0.5.
  assert res.upper >= 0.5


def _branching_net(key, inputs=3, width=6):
  """A net with every node kind the linear forms take: affine, ReLU, a clip that clips, a
  concatenation and a difference of two input-dependent values."""
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  w1 = jax.random.normal(k1, (inputs, width))
  w3 = jax.random.normal(k2, (inputs, width))
  w2 = jax.random.normal(k3, (2 * width, 2)) / np.sqrt(width)
  w4 = jax.random.normal(k4, (2 * width, 2)) / np.sqrt(width)
  b1 = 0.3 * jax.random.normal(k5, (width,))

  def f(x):
    h = jnp.concatenate([jax.nn.relu(x @ w1 + b1), jnp.clip(x @ w3, -0.3, 0.4)])
    return h @ w2 - jax.nn.relu(h @ w4)

  return f


def _forms_hold(g, lo, hi, rng):
  """linear_bounds(g) over each box below every sampled value of g there (float64 evaluation)."""
  value, lam = forms.linear_bounds(g, lo, hi)
  k, d = lo.shape
  xs = lo[:, None] + rng.uniform(size=(k, 200, d)) * (hi - lo)[:, None]
  out = np.asarray(H.eval64(g, xs.reshape(-1, d).astype(np.float32)), np.float64).reshape(k, 200, -1)
  xs = xs.astype(np.float32).astype(np.float64)
  rows = np.concatenate([out, -out], axis=-1)  # (k, 200, 2n): +f_j, -f_j
  at_min = np.minimum(lam * lo[:, None], lam * hi[:, None]).sum(-1)  # (k, 2n)
  bound = value[:, None] + np.einsum("kri,kpi->kpr", lam, xs) - at_min[:, None]
  assert np.all(rows >= bound - 1e-5 * (1 + np.abs(rows)))
  return value, lam


@pytest.mark.parametrize("path", ["numpy", "jax"])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), width=st.sampled_from([0.01, 0.2, 1.0]))
def test_linear_forms_of_every_node_kind_hold_on_random_boxes(path, seed, width):
  g = qb.trace(_branching_net(jax.random.key(seed)), jnp.zeros(3))
  assert forms.supported(g) and forms._numpy_steps(g) is not None
  assert {n.kind for n in g.nodes} >= {"affine", "relu", "clip", "concat", "add"}
  rng = np.random.default_rng(seed)
  lo = rng.uniform(-1, 0.8, (32, 3)).astype(np.float32)
  hi = (lo + rng.uniform(0, width, (32, 3))).astype(np.float32)
  with pytest.MonkeyPatch.context() as patch:
    if path == "jax":
      patch.setattr(forms, "_numpy_steps", lambda graph: None)
    _forms_hold(g, lo, hi, rng)


def test_numpy_and_compiled_linear_forms_agree():
  # The NumPy path (no compilation: a first call's grid starts at once) computes what the compiled
  # float64 program does, up to the rounding of float64 sums (a float32 ulp of the result at most).
  g = qb.trace(_branching_net(jax.random.key(3)), jnp.zeros(3))
  rng = np.random.default_rng(1)
  lo = rng.uniform(-1, 0.8, (300, 3)).astype(np.float32)
  hi = (lo + rng.uniform(0, 0.3, (300, 3))).astype(np.float32)
  v_np, lam_np = forms.linear_bounds(g, lo, hi)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(forms, "_numpy_steps", lambda graph: None)
    v_jax, lam_jax = forms.linear_bounds(g, lo, hi)
  assert v_np.dtype == v_jax.dtype == np.float32 and lam_np.shape == lam_jax.shape
  np.testing.assert_allclose(v_np, v_jax, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lam_np, lam_jax, rtol=1e-6, atol=1e-6)


def test_convolutions_take_the_compiled_linear_forms():
  w = jax.random.normal(jax.random.key(0), (3, 3, 1, 2))
  f = lambda x: jax.nn.relu(jax.lax.conv_general_dilated(  # noqa: E731
      x[None], w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))).reshape(-1)
  g = qb.trace(f, jnp.zeros((4, 4, 1)))
  assert forms.supported(g) and forms._numpy_steps(g) is None
  rng = np.random.default_rng(0)
  lo = rng.uniform(-1, 0.8, (8, 4, 4, 1)).astype(np.float32)
  hi = lo + np.float32(0.1)
  value, lam = forms.linear_bounds(g, lo, hi)
  assert value.shape == (8, 16) and lam.shape == (8, 16, 4, 4, 1)
  xs = lo + rng.uniform(size=(200, *lo.shape)).astype(np.float32) * (hi - lo)
  out = np.stack([np.asarray(H.eval64(g, x), np.float64) for x in xs], 1)  # (8, 200, 8)
  rows = np.concatenate([out, -out], axis=-1)
  flat = lambda a: a.reshape(a.shape[0], -1).astype(np.float64)  # noqa: E731
  lam2 = lam.reshape(8, 16, -1).astype(np.float64)
  at_min = np.minimum(lam2 * flat(lo)[:, None], lam2 * flat(hi)[:, None]).sum(-1)
  bound = value[:, None] + np.einsum("kri,pki->kpr", lam2, xs.reshape(200, 8, -1).astype(np.float64)) - at_min[:, None]
  assert np.all(rows >= bound - 1e-5 * (1 + np.abs(rows)))


def test_linear_forms_hold_on_random_boxes():
  f, _ = _rounded_mlp(jax.random.key(2))
  g = qb.trace(f, jnp.zeros(3))
  assert forms.supported(g)
  rng = np.random.default_rng(0)
  lo = rng.uniform(-1, 0.8, (64, 3)).astype(np.float32)
  hi = (lo + rng.uniform(0, 0.2, (64, 3))).astype(np.float32)
  value, lam = forms.linear_bounds(g, lo, hi)
  xs = lo[:, None] + rng.uniform(size=(64, 200, 3)) * (hi - lo)[:, None]
  out = np.asarray(H.eval64(g, xs.reshape(-1, 3).astype(np.float32)), np.float64).reshape(64, 200, -1)
  xs = xs.astype(np.float32).astype(np.float64)
  n = out.shape[-1]
  rows = np.concatenate([out, -out], axis=-1)  # (64, 200, 2n): +f_j, -f_j
  at_min = np.minimum(lam * lo[:, None], lam * hi[:, None]).sum(-1)  # (64, 2n)
  bound = value[:, None] + np.einsum("kri,kpi->kpr", lam, xs) - at_min[:, None]
  assert np.all(rows >= bound - 1e-5 * (1 + np.abs(rows)))
  assert n == 2


def test_auto_max_cells_scales_with_time_and_the_share_of_a_core():
  rate = grid.AUTO_CELLS_PER_SECOND
  assert grid.auto_max_cells(0.0, 1.0) == grid.auto_max_cells(-1.0, 1.0) == grid.AUTO_MAX_CELLS
  assert grid.auto_max_cells(10.0, 1.0) == 10 * rate
  assert grid.auto_max_cells(10.0, 0.25) == int(2.5 * rate)  # a busy machine: fewer cells
  assert 0.0 < grid.core_share() <= 1.0


def test_certify_auto_enumerates_small_grids():
  f, fq = _rounded_mlp(jax.random.key(0))
  box = qb.Box(jnp.array([-0.3, 0.1, -0.5]), jnp.array([0.2, 0.6, 0.0]))
  cert = qb.certify(f, fq, box, time_budget=60)  # it returns once the gap is closed (seconds, cold)
  assert "grid" in cert.bounds and cert.seconds < 60
  assert cert.lower <= cert.upper <= 1.1 * cert.lower


@pytest.mark.parametrize("module", [grid, forms, cell_bounds])
def test_docstring_examples_run(module):
  import doctest

  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


def test_first_pass_candidates_leave_the_bounds_unchanged():
  # candidates=True adds one cell per group (where the error looks largest) and changes no bound.
  f, fq = _rounded_mlp(jax.random.key(3))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  edges = cells.input_cells(merged.fq_graph, box)
  layout = grid._Grid(merged.f_graph, merged.fq_graph, box, edges, True,  # noqa: SLF001
                      interval_bounds(merged.fq_graph, box, True))
  k = layout.n_blocks
  b_lo, b_hi = layout.block_boxes(k)
  value, lam = forms.linear_bounds(merged.f_graph, b_lo, b_hi)
  args = (merged.fq_graph, layout.q_err, layout.tables, 0, value, lam, b_lo, b_hi)
  kw = dict(k=k, counts=layout.counts, per=layout.per, blocks_per=layout.blocks_per,
            group_cells=3 * layout.cells_per_block)
  plain = np.asarray(cell_bounds.chunk_bounds(*args, **kw))
  bounds, positions, guesses = (np.asarray(a) for a in cell_bounds.chunk_bounds(*args, **kw, candidates=True))
  np.testing.assert_array_equal(bounds, plain)
  groups = -(-k // 3)
  assert positions.shape == guesses.shape == (groups,)
  assert np.all((positions >= 0) & (positions < plain.size)) and np.all(np.isfinite(guesses))
  # Each group's candidate lies in that group's cells.
  np.testing.assert_array_equal(positions // (3 * layout.cells_per_block), np.arange(groups))


def test_grid_reports_reached_inputs_during_its_first_pass(monkeypatch):
  # Several chunks; stopped after the second: no bound, but the inputs reached so far were reported,
  # each in the box, and their errors (float64) stay below the full enumeration's bound.
  monkeypatch.setattr(grid, "CHUNK_CELLS", 512)
  f, fq = _rounded_mlp(jax.random.key(1))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  chunks, seen = [], []
  chunk = grid.chunk_bounds
  monkeypatch.setattr(grid, "chunk_bounds", lambda *a, **k: chunks.append(1) or chunk(*a, **k))
  assert grid.grid_error(merged, box, stop=lambda: len(chunks) >= 2, report=seen.append) is None
  assert seen and all(x.shape == (3,) for x in seen)
  xs = np.stack(seen)
  assert np.all((xs >= np.asarray(box.lower)) & (xs <= np.asarray(box.upper)))
  errs = np.abs(H.eval64(merged, xs)).max(axis=1)
  assert np.all(np.diff(errs) > 0)  # reported only when the reached error rose
  full_seen, uppers = [], []
  full = grid.grid_error(merged, box, report=full_seen.append, report_upper=uppers.append)
  assert errs.max() <= full.upper
  # The full call's last report is its witness; every bound reported on the way holds.
  np.testing.assert_array_equal(full_seen[-1], full.witness.reshape(3))
  assert all(u >= full.upper for u in uppers)
  edges = cells.input_cells(merged.fq_graph, box)
  assert _sampled_max(merged, box, edges) <= min(uppers + [full.upper])


def test_grid_refines_until_its_own_deadline(monkeypatch):
  # The first pass may run past a refine_deadline: a proven bound, refined no further than the
  # cells whose corners give the reached error.
  monkeypatch.setattr(grid, "MAX_BLOCKS", 8)
  f, fq = _rounded_mlp(jax.random.key(0))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  early = grid.grid_error(merged, box, refine_gap=0.0, refine_deadline=0.0)
  full = grid.grid_error(merged, box, refine_gap=0.0)
  assert early is not None and early.refined <= grid.WITNESS_CELLS < full.refined
  assert full.upper <= early.upper
  edges = cells.input_cells(merged.fq_graph, box)
  assert _sampled_max(merged, box, edges) <= full.upper


@pytest.mark.parametrize("scale", [1 / 8, 0.37])
def test_the_input_chain_read_off_the_weights_equals_its_evaluation(scale):
  # cells._dense_path (NumPy: nothing compiles) and cells._path_by_jax give the same chain.
  w = jax.random.normal(jax.random.key(0), (3, 4))
  fq = lambda x: jnp.round(jnp.clip((x * 2.0 + 0.25) / scale, -127, 127)) @ w  # noqa: E731
  g = qb.trace(fq, jnp.zeros(3))
  gate = cells.pre_rounding(g)[0][0]
  src = g.nodes[gate].inputs[0]
  while g.nodes[src].kind == "clip":
    src = g.nodes[src].inputs[0]
  m, b = cells._dense_path(g, src, 3)
  m_jax, b_jax = cells._path_by_jax(g, src, 3)
  np.testing.assert_allclose(m, m_jax, rtol=1e-15)
  np.testing.assert_allclose(b, b_jax, rtol=1e-15, atol=1e-15)
  assert np.count_nonzero(m - np.diag(np.diag(m))) == 0 and np.allclose(np.diag(m), 2.0 / scale)


@given(st.integers(1, 3000), st.integers(1, 40), st.integers(1, 64), st.booleans(), st.integers(0, 2**31 - 1))
def test_the_largest_finite_bounds_are_found_row_by_row(size, n, row, ties, seed):
  """The pass keeps each chunk's largest finite bounds (where the refinement starts) by rows: they
  are the largest of all, ties and infinite bounds (possible ties of f_q) included."""
  rng = np.random.default_rng(seed)
  values = rng.integers(0, 20, size).astype(np.float64) if ties else rng.random(size)
  values[rng.random(size) < 0.3] = np.inf
  got = grid._largest_finite(values, n, row=row)
  assert np.unique(got).size == got.size and np.all(np.isfinite(values[got]))
  finite = np.sort(values[np.isfinite(values)])[::-1]
  np.testing.assert_array_equal(np.sort(values[got])[::-1], finite[:n])
