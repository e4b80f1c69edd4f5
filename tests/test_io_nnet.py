"""Tests of qbound.io.nnet: the NNet reader against an independent numpy float64 forward pass,
exact save/load round trips, and clear errors on broken files."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qbound.io import bundled_path, load_nnet, read_nnet_header, save_nnet

BENCH = Path(__file__).parents[1] / ".." / "shared" / "bench"
BENCH_FILES = sorted(BENCH.glob("nnet/*.nnet")) + sorted(BENCH.glob("nnet_16bit/*.nnet"))
ACAS = "ACASXU_run2a_1_1_batch_2000.nnet"
ACAS_16 = "ACASXU_run2a_1_1_batch_2000_16bit.nnet"


@pytest.fixture(autouse=True)
def strict_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


def reference_forward(path, xs):
  """A float64 NNet forward pass written straight from the format description, for xs (batch, in)."""
  lines = [line for line in Path(path).read_text().splitlines() if not line.startswith("//")]
  values = [[float(t) for t in line.split(",") if t.strip()] for line in lines]
  num_layers, num_inputs = int(values[0][0]), int(values[0][1])
  sizes = [int(v) for v in values[1]]
  mins, maxes, means, ranges = (np.array(values[i][:num_inputs]) for i in range(3, 7))
  h = (np.clip(xs, mins, maxes) - means) / ranges
  at = 7
  for k in range(num_layers):
    n = sizes[k + 1]
    weights = np.array(values[at:at + n])
    biases = np.array([v[0] for v in values[at + n:at + 2 * n]])
    at += 2 * n
    h = h @ weights.T + biases
    if k < num_layers - 1:
      h = np.maximum(h, 0.0)
  return h


def random_inputs(path, params, n=32, seed=0):
  rng = np.random.default_rng(seed)
  if "ACAS" in path.name:  # the ACAS Xu input box, widened so that clipping is exercised
    lo, hi = np.array([0, -3.2, -3.2, 100, 0]), np.array([61000, 3.2, 3.2, 1200, 1200])
    return rng.uniform(lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo), (n, 5)).astype(np.float32)
  size = params["normalisation"]["mins"].shape[0]
  return rng.uniform(-1.0, 1.0, (n, size)).astype(np.float32)


@functools.cache
def batched(apply):
  return jax.jit(jax.vmap(apply, in_axes=(None, 0)))


@pytest.mark.skipif(not BENCH_FILES, reason=f"benchmark networks not found at {BENCH.resolve()} "
                                            "(the shared bench checkout beside the repository)")
@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_matches_float64_reference_on_bench_files(path):
  apply, params = load_nnet(path)
  xs = random_inputs(path, params)
  got = np.asarray(batched(apply)(params, xs))
  want = reference_forward(path, xs.astype(np.float64))
  assert got.dtype == np.float32 and np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif(not (BENCH / "nnet" / "mnist_relu_3_100.nnet").exists(),
                    reason=f"mnist_relu_3_100.nnet not found under {BENCH.resolve()}")
def test_float32_limit_mins_and_maxes_stay_finite():
  apply, params = load_nnet(BENCH / "nnet" / "mnist_relu_3_100.nnet")
  norm = params["normalisation"]
  # The file writes +-3.40282e+38: just inside the float32 range, so no infinities appear.
  assert np.isfinite(norm["mins"]).all() and np.isfinite(norm["maxes"]).all()
  assert float(norm["maxes"][0]) == pytest.approx(3.40282e38, rel=1e-6)
  x = jnp.concatenate([jnp.full(392, 1e30, jnp.float32), jnp.full(392, -1e30, jnp.float32)])
  assert np.isfinite(np.asarray(apply(params, jnp.zeros(784, jnp.float32)))).all()
  assert not np.isnan(np.asarray(apply(params, x))).any()


def test_bundled_acas_matches_reference_and_keeps_its_licence():
  path = bundled_path(ACAS)
  apply, params = load_nnet(path)
  assert [layer["kernel"].shape for layer in params["params"].values()] == \
      [(5, 50)] + [(50, 50)] * 5 + [(50, 5)]
  # The artifact's normalisation lines carry 7 (and 8) entries for 5 inputs.
  assert params["normalisation"]["means"].shape == (5,)
  assert float(params["normalisation"]["output_mean"]) == pytest.approx(7.5188840201005975)
  xs = random_inputs(Path(path), params, n=16, seed=1)
  want = reference_forward(path, xs.astype(np.float64))
  np.testing.assert_allclose(np.asarray(batched(apply)(params, xs)), want,
                             rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert any("Creative Commons" in line for line in read_nnet_header(path))


def test_bundled_16bit_copy_holds_float16_values():
  _, params = load_nnet(bundled_path(ACAS_16))
  for leaf in jax.tree.leaves(params["params"]):
    leaf = np.asarray(leaf)
    assert (leaf.astype(np.float16).astype(np.float32) == leaf).all()
  assert read_nnet_header(bundled_path(ACAS_16)) == []  # the artifact wrote it without a notice


def test_bundled_path_names_what_exists():
  assert bundled_path("LICENSE-bench.md").is_file()
  with pytest.raises(FileNotFoundError, match=ACAS):
    bundled_path("no_such_network.nnet")
  with pytest.raises(FileNotFoundError):
    bundled_path("../io/nnet.py")


def random_params(key, sizes):
  keys = jax.random.split(key, 2 * len(sizes))
  layers = {f"dense_{k}": {"kernel": jax.random.normal(keys[2 * k], (n_in, n_out)),
                           "bias": jax.random.normal(keys[2 * k + 1], (n_out,))}
            for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))}
  n = sizes[0]
  normalisation = {"mins": -jnp.arange(1.0, n + 1), "maxes": jnp.arange(1.0, n + 1) / 3,
                   "means": jnp.full(n, 0.1), "ranges": jnp.full(n, 0.7),
                   "output_mean": jnp.asarray(0.25), "output_range": jnp.asarray(3.0)}
  return {"params": layers, "normalisation": normalisation}


def test_save_load_round_trip_is_exact(tmp_path):
  params = random_params(jax.random.key(0), [4, 7, 6, 3])
  header = ["// a licence notice", "written without its slashes"]
  path = tmp_path / "net.nnet"
  save_nnet(path, params, header=header)
  apply, loaded = load_nnet(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert read_nnet_header(path) == ["// a licence notice", "// written without its slashes"]
  x = jnp.array([0.3, -2.0, 0.9, 0.0])
  np.testing.assert_array_equal(apply(loaded, x), apply(params, x))
  text = path.read_text()
  save_nnet(path, loaded, header=read_nnet_header(path))
  assert path.read_text() == text


def test_save_without_normalisation_and_with_flax_names(tmp_path):
  params = random_params(jax.random.key(1), [3, 5, 2])
  layers = {"Dense_1": params["params"]["dense_1"], "Dense_0": params["params"]["dense_0"]}
  save_nnet(tmp_path / "net.nnet", {"params": layers})
  apply, loaded = load_nnet(tmp_path / "net.nnet")
  x = jnp.array([1e4, -2.0, 0.5])
  want = jax.nn.relu(x @ layers["Dense_0"]["kernel"] + layers["Dense_0"]["bias"])
  want = want @ layers["Dense_1"]["kernel"] + layers["Dense_1"]["bias"]
  np.testing.assert_allclose(apply(loaded, x), want, rtol=1e-6)


def test_bundled_file_round_trips(tmp_path):
  source = bundled_path(ACAS)
  _, params = load_nnet(source)
  save_nnet(tmp_path / "copy.nnet", params, header=read_nnet_header(source))
  _, again = load_nnet(tmp_path / "copy.nnet")
  for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert read_nnet_header(tmp_path / "copy.nnet") == read_nnet_header(source)


def test_save_rejects_params_that_are_not_a_dense_chain(tmp_path):
  params = random_params(jax.random.key(2), [3, 5, 2])
  params["params"]["dense_1"]["kernel"] = jnp.zeros((4, 2))
  with pytest.raises(ValueError, match="takes 4 inputs"):
    save_nnet(tmp_path / "bad.nnet", params)
  # A file load_nnet would refuse is never written: NaN or inf weights are named instead.
  params = random_params(jax.random.key(2), [3, 5, 2])
  params["params"]["dense_1"]["bias"] = params["params"]["dense_1"]["bias"].at[0].set(jnp.nan)
  with pytest.raises(ValueError, match="'dense_1': its bias holds nan"):
    save_nnet(tmp_path / "nan.nnet", params)
  assert not (tmp_path / "nan.nnet").exists()


def test_apply_refuses_a_batch():
  apply, params = load_nnet(bundled_path(ACAS))
  with pytest.raises(ValueError, match="vmap"):
    apply(params, jnp.zeros((2, 5)))


SMALL = """// comment
2,2,1,3,
2,3,1,
0,
-1.0,-1.0,
1.0,1.0,
0.0,0.0,0.0,
1.0,1.0,1.0,
1.0,2.0,
3.0,4.0,
5.0,6.0,
0.1,
0.2,
0.3,
7.0,8.0,9.0,
0.4,
"""


def write(tmp_path, text):
  path = tmp_path / "broken.nnet"
  path.write_text(text)
  return path


def replace_line(text, number, new):
  lines = text.splitlines()
  lines[number - 1] = new
  return "\n".join(lines) + "\n"


def test_small_file_parses(tmp_path):
  apply, params = load_nnet(write(tmp_path, SMALL))
  np.testing.assert_allclose(params["params"]["dense_0"]["kernel"], [[1, 3, 5], [2, 4, 6]])
  y = apply(params, jnp.array([0.5, 2.0]))  # clipped to (0.5, 1.0)
  hidden = np.maximum(np.array([[1, 2], [3, 4], [5, 6]]) @ [0.5, 1.0] + [0.1, 0.2, 0.3], 0)
  np.testing.assert_allclose(y, hidden @ [7, 8, 9] + 0.4, rtol=1e-6)


@pytest.mark.parametrize("text, match", [
    ("\n".join(SMALL.splitlines()[:12]) + "\n", r"file ends \(after line 12\) where one bias: bias 1"),
    (replace_line(SMALL, 10, "3.0,"),
     r"line 10: expected 2 weights: row 1 of the 3x2 matrix of layer 0, found 1"),
    (replace_line(SMALL, 11, "5.0,six,"), r"line 11: 'six' is not a number \(expected 2 weights"),
    (replace_line(SMALL, 2, "2,2,1,"), r"line 2: expected numLayers,numInputs,numOutputs,maxLayerSize"),
    (replace_line(SMALL, 3, "2,3,2,"), r"line 3: layer sizes \[2, 3, 2\] must .* end with numOutputs=1"),
    (replace_line(SMALL, 3, "2,3.5,1,"), r"line 3: '3.5' is not an integer"),
    (replace_line(SMALL, 7, "0.0,0.0,"), r"line 7: expected 3 means \(inputs, then output\), found 2"),
    (replace_line(SMALL, 8, "1.0,0.0,1.0,"), r"line 8: a range is 0"),
    (replace_line(SMALL, 14, "nan,"), r"line 14: biases must be finite"),
    (SMALL + "1.0,\n", r"line 17: unexpected data after the last bias"),
], ids=["truncated", "short-row", "non-numeric", "header-count", "sizes", "non-integer",
        "means", "zero-range", "nan-bias", "trailing-data"])
def test_broken_files_name_file_line_and_expectation(tmp_path, text, match):
  path = write(tmp_path, text)
  with pytest.raises(ValueError, match=match) as info:
    load_nnet(path)
  assert str(path) in str(info.value)


# --- files that are not NNet text --------------------------------------------------------------


@pytest.mark.parametrize("content, line", [
    (bytes(range(256)), 1),                                           # binary from the first byte
    (np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes(), 1),
    (b"// header\n2,2,1,3,\n2,3,1,\n\x00\x00\x00,\n", 4),             # NUL bytes on a data line
    (b"// header\n2,2,1,3,\n2,3,\xe91,\n", 3),                          # Latin-1 byte on a data line
])
def test_bytes_that_are_not_text_name_file_and_line(tmp_path, content, line):
  path = tmp_path / "random.nnet"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=rf"random\.nnet, line {line}: not a text NNet file: byte 0x[0-9a-f]{{2}}"):
    load_nnet(path)
  assert read_nnet_header(path) == ([] if line == 1 else ["// header"])  # no UnicodeDecodeError either


def test_truncated_bundled_file_names_file_and_line(tmp_path):
  data = Path(bundled_path("digits_mlp.nnet")).read_bytes()
  for cut in (100, 3000, len(data) // 2, len(data) - 10):
    path = tmp_path / f"cut{cut}.nnet"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError) as info:
      load_nnet(path)
    assert str(path) in str(info.value) and ("line" in str(info.value))


def test_latin1_comment_is_read_not_refused(tmp_path):
  path = tmp_path / "latin.nnet"
  path.write_bytes(b"// Copyright caf\xe9\n" + SMALL.encode())
  apply, params = load_nnet(path)
  assert read_nnet_header(path)[0] == "// Copyright caf\u00e9"
  save_nnet(tmp_path / "copy.nnet", params, header=read_nnet_header(path))  # written back as UTF-8
  assert read_nnet_header(tmp_path / "copy.nnet")[0] == "// Copyright caf\u00e9"
