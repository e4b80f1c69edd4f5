"""Soundness on QEBVerif-style fully quantized networks (Zhang et al., "QEBVerif: Quantization Error
Bound Verification of Neural Networks", CAV 2023; github.com/S3L-official/QEBVerif).

QEBVerif compares a float network ``f(x) = relu((x/255) W1 + b1) W2 + b2`` on integer pixels
``x in 0..255`` with its fixed-point twin ``f_q``: the input read as ``x/256``, weights rounded
half away from zero to ``q-1`` fractional bits, biases to ``q-2``, and the hidden layer requantized
to ``q`` unsigned bits, ``clip(floor(z 2^(q-2) + 1/2), 0, 2^q - 1) / 2^(q-2)`` with
``z = relu((x/256) Wq1 + bq1)`` (their ``_renormalize``: round half up, then saturate).

The saturating clip is what these tests are about. merge() pairs it with an identity clip at
+-inf inserted into f, and the differential bounds once assumed the two clips of a pair cut at the
same places: a certificate then came out below errors f_q actually makes (the one-neuron
reproducer below, fixed in ``relax.clip_diff`` / ``clip_diff_interval``). Every certificate here is
checked against errors reached on the integer lattice of the box (the inputs QEBVerif quantifies
over), the box's corners and gradient ascent, all re-evaluated with the networks themselves in
float64 (exact for f_q at integer inputs: every product and sum is a short dyadic rational).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb

# Float64 evaluation of f (x/255 is not dyadic) is within ~1e-15 of the real-arithmetic value the
# bounds enclose; anything past this tolerance is a soundness violation.
ATOL = 1e-9
# One search setting for every gradient ascent here: maximize_error compiles once per
# (graph structure, setting).
SEARCH = qb.Search(samples=1024, restarts=8, steps=60)


# --- the fixed-point semantics -------------------------------------------------------------------

def half_away(v):
  """Round half away from zero (QEBVerif's weight quantizer; np.round would round halves to even)."""
  return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize_params(params, q):
  """Weights at ``q-1`` fractional bits, biases at ``q-2``, as float32 (exactly representable)."""
  def at(v, frac):
    return (half_away(np.asarray(v, np.float64) * 2.0 ** frac) / 2.0 ** frac).astype(np.float32)

  return {"W1": at(params["W1"], q - 1), "b1": at(params["b1"], q - 2),
          "W2": at(params["W2"], q - 1), "b2": at(params["b2"], q - 2)}


def float_net(p):
  """QEBVerif's DNN: pixels scaled by 1/255. Weights are float32 numpy, so the same function runs
  in float32 for qbound and in float64 under ``jax.enable_x64`` with float64 inputs."""
  def f(x):
    return jax.nn.relu((x / 255.0) @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

  return f


def fixed_point_net(qp, q, form="literal"):
  """QEBVerif's QNN on the parameters ``qp`` (from :func:`quantize_params`), in one of three forms
  that are the same function in real arithmetic (checked on the lattice below):

  * ``"literal"``: ``floor(relu(z) s + 1/2)``, the semantics as written;
  * ``"bias"``: the half folded into the bias, ``floor(relu(z + 1/(2s)) s)`` (for ``z < 0`` both
    give 0: ``relu(z + 1/(2s)) s < 1/2``);
  * ``"away"``: ``round_half_away(relu(z) s)``, equal to round half up on the argument, which is
    never negative.

  merge() pairs each of them with f: f gets identities beside f_q's scaling, rounding, clip and
  unscaling (the scalings without f_q's shifts, so the chain is the identity for the literal one too).
  """
  s, top = 2.0 ** (q - 2), 2.0 ** q - 1
  bias_half = (qp["b1"] + 0.5 / s).astype(np.float32)  # exact: both on the 2^-(q-1) grid

  def fq(x):
    x = x / 256.0
    if form == "literal":
      v = jnp.floor(jax.nn.relu(x @ qp["W1"] + qp["b1"]) * s + 0.5)
    elif form == "bias":
      v = jnp.floor(jax.nn.relu(x @ qp["W1"] + bias_half) * s)
    elif form == "away":
      v = jax.lax.round(jax.nn.relu(x @ qp["W1"] + qp["b1"]) * s, jax.lax.RoundingMethod.AWAY_FROM_ZERO)
    else:
      raise ValueError(form)
    return (jnp.clip(v, 0.0, top) / s) @ qp["W2"] + qp["b2"]

  return fq


def errors64(f, fq, xs) -> np.ndarray:
  """``f(x) - fq(x)`` per input (rows) and output (columns), evaluated by the networks in float64."""
  xs = np.asarray(xs, np.float64).reshape(len(xs), -1)
  with jax.enable_x64(True):
    x = jnp.asarray(xs, jnp.float64)
    out = jax.vmap(f)(x) - jax.vmap(fq)(x)
    assert out.dtype == jnp.float64
    return np.asarray(out, np.float64).reshape(len(xs), -1)


def lattice_points(box, num, rng) -> np.ndarray:
  """Uniform random integer points of a box with integer ends, its two extreme corners and random
  vertices: the inputs QEBVerif quantifies over."""
  lo, hi = np.asarray(box.lower, np.int64), np.asarray(box.upper, np.int64)
  assert np.array_equal(lo, np.asarray(box.lower)) and np.array_equal(hi, np.asarray(box.upper))
  ints = rng.integers(lo, hi + 1, size=(num, lo.size))
  vertices = np.where(rng.integers(0, 2, size=(num // 4, lo.size)).astype(bool), hi, lo)
  return np.concatenate([ints, vertices, lo[None], hi[None]]).astype(np.float64)


def ascent_points(f, fq, box, weight, key):
  """Gradient ascent (qb.maximize_error) on the merged network of ``weight * f`` and
  ``weight * fq``: a one-hot weight aims it at one output, ones at all; the weight is an argument
  of the merged graph, so every output, image and bit width reuses one compiled search. Returns the
  witness and its nearest lattice point."""
  merged = qb.merge(lambda x: f(x) * weight, lambda x: fq(x) * weight, box)
  _, x = qb.maximize_error(merged, box, key=key, search=SEARCH)
  x = np.asarray(x, np.float64)
  lattice = np.clip(np.round(x), np.asarray(box.lower), np.asarray(box.upper))
  return np.stack([x, lattice])


def assert_encloses(lower, upper, diffs, label):
  """Every reached ``f_j - fq_j`` lies in the proven ``[lower_j, upper_j]``."""
  lower, upper = np.asarray(lower, np.float64).reshape(-1), np.asarray(upper, np.float64).reshape(-1)
  below = diffs < lower - ATOL
  above = diffs > upper + ATOL
  if below.any() or above.any():
    rows, cols = np.nonzero(below | above)
    j = cols[0]
    raise AssertionError(f"{label}: output {j} reaches f - fq = {diffs[rows[0], j]!r} outside the proven "
                         f"[{lower[j]!r}, {upper[j]!r}]")


def assert_certificate_sound(cert, diffs, outputs, label):
  """The certificate's per-output bounds enclose every reached difference (all outputs: those
  bounds are proven for every output, ``outputs`` only selects what ``upper`` covers), and
  ``upper`` is at least every reached error on the selected outputs. Returns the largest error
  reached on them (the certificate's own witness included)."""
  assert_encloses(cert.diff_lower, cert.diff_upper, diffs, label)
  reached = float(np.max(np.abs(diffs[:, outputs])))
  assert cert.upper >= reached - ATOL, f"{label}: reached error {reached!r} above the certified {cert.upper!r}"
  assert cert.lower <= cert.upper
  return max(reached, cert.lower)


# --- (a) the one-neuron reproducer -----------------------------------------------------------------

def one_neuron():
  W = jnp.ones((1, 1))
  f = lambda x: jax.nn.relu(x @ W) @ W
  fq = lambda x: (jnp.clip(jnp.floor(jax.nn.relu(x @ W) * 1.0), 0.0, 1.0) / 1.0) @ W
  return f, fq, qb.Box(jnp.array([2.0]), jnp.array([3.0]))


def test_one_neuron_saturating_clip():
  """On [2, 3], f(x) = x and fq(x) = min(floor(x), 1) = 1: the error f - fq is x - 1, with range
  [1, 2]. The identity clip merge() puts into f beside fq's clip at [0, 1] does not saturate, so
  the pair's difference is NOT between min(d, 0) and max(d, 0) (ReluDiff's rule for one clip,
  which gave an upper bound of about 1 before the fix)."""
  f, fq, box = one_neuron()
  merged = qb.merge(f, fq, box)
  assert merged.paired  # the differential path is the one exercised
  xs = np.linspace(2.0, 3.0, 101)[:, None]
  diffs = errors64(f, fq, xs)
  np.testing.assert_allclose(diffs[:, 0], xs[:, 0] - 1, atol=1e-12)
  for symbolic in (True, False):
    d = qb.bounds.diff(f, fq, box, symbolic=symbolic)
    lo, hi = float(d.lower[0]), float(d.upper[0])
    assert lo <= 1.0 and hi >= 2.0, f"symbolic={symbolic}: [{lo}, {hi}] misses the range [1, 2]"
    assert lo >= 0.99 and hi <= 2.01, f"symbolic={symbolic}: [{lo}, {hi}] is loose around [1, 2]"
    print(f"one neuron, symbolic={symbolic}: f - fq in [{lo!r}, {hi!r}]")
  # time_budget is the call's deadline, compilation included: 30 s covers a cold compile on a loaded
  # machine, and the call ends as soon as the gap closes.
  cert = qb.certify(f, fq, box, time_budget=30.0)
  assert_certificate_sound(cert, diffs, [0], "one neuron certify")
  print(f"one neuron: {cert}")
  assert cert.lower == pytest.approx(2.0) and cert.upper <= 2.01


# --- (b) the 8-16-3 random reproducer ----------------------------------------------------------------

def random_qnn(seed=0, q=8, n=8, h=16, o=3):
  """A random 8-16-3 float net and its fixed-point twin (the half folded into the bias, as
  ``fixed_point_net(form="bias")``): the reproducer the clip fix was found with (seed 0, q = 8)."""
  rng = np.random.default_rng(seed)
  s = 2.0 ** (q - 2)
  top = 2.0 ** q - 1
  W1 = rng.normal(0, 1.5, (n, h)).astype(np.float32)
  b1 = rng.normal(0, 1, h).astype(np.float32)
  W2 = rng.normal(0, 0.5, (h, o)).astype(np.float32)
  b2 = rng.normal(0, 0.5, o).astype(np.float32)
  Wq1 = (np.round(W1 * 2 ** (q - 1)) / 2 ** (q - 1)).astype(np.float32)
  bq1h = (np.round(b1 * s) / s + 0.5 / s).astype(np.float32)
  Wq2 = (np.round(W2 * 2 ** (q - 1)) / 2 ** (q - 1)).astype(np.float32)
  bq2 = (np.round(b2 * s) / s).astype(np.float32)

  def f(x):
    x = x / 255.0
    return jax.nn.relu(x @ W1 + b1) @ W2 + b2

  def fq(x):
    x = x / 256.0
    hq = jnp.clip(jnp.floor(jax.nn.relu(x @ Wq1 + bq1h) * s), 0.0, top) / s
    return hq @ Wq2 + bq2

  return f, fq, qb.Box(lower=jnp.zeros(n), upper=255 * jnp.ones(n))


def reached_differences(f, fq, box, *, uniform, lattice, seed, outputs=None):
  """``f - fq`` (float64) at uniform samples, lattice points, corners and the gradient-ascent
  witnesses (on all outputs, and on each of ``outputs`` alone)."""
  rng = np.random.default_rng(seed)
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  parts = [lo + rng.uniform(size=(uniform, lo.size)) * (hi - lo), lattice_points(box, lattice, rng)]
  n_out = errors64(f, fq, lo[None]).shape[1]
  weights = [np.ones(n_out, np.float32)] + [np.eye(n_out, dtype=np.float32)[j] for j in (outputs or [])]
  for k, w in enumerate(weights):
    parts.append(ascent_points(f, fq, box, w, jax.random.key(seed * 100 + k)))
  return errors64(f, fq, np.concatenate(parts))


# ~33 s of the default run's 15 minutes (200k samples and a 30 s certify): runs with -m slow.
@pytest.mark.slow
def test_random_8_16_3_reproducer():
  """The reproducer of the clip fix: the differential bound of every output encloses what
  200k uniform samples, lattice points, corners and gradient ascent reach, and certify() (branch
  and bound first on these 8 inputs) returns a certificate within a factor 2 of the reached error."""
  f, fq, box = random_qnn()
  assert qb.merge(f, fq, box).paired
  diffs = reached_differences(f, fq, box, uniform=200_000, lattice=20_000, seed=0, outputs=[0, 1, 2])
  reached = float(np.max(np.abs(diffs)))
  d = qb.bounds.diff(f, fq, box)
  assert_encloses(d.lower, d.upper, diffs, "8-16-3 diff")
  assert float(jnp.max(jnp.maximum(-d.lower, d.upper))) >= reached
  # Raises SoundnessError if its own witness beats it. The budget (the call's deadline) covers a cold
  # compile on a loaded machine; the call ends once the gap closes.
  cert = qb.certify(f, fq, box, time_budget=30.0)
  reached = assert_certificate_sound(cert, diffs, [0, 1, 2], "8-16-3 certify")
  print(f"8-16-3: diff bound {float(jnp.max(jnp.maximum(-d.lower, d.upper))):.6g}, {cert}, reached {reached:.6g}")
  assert cert.upper / cert.lower <= 2.0, str(cert)


@pytest.mark.parametrize("seed, q", [(1, 4), (2, 8), (3, 4), (4, 8), (5, 10), (6, 10)])
def test_random_8_16_3_family(seed, q):
  """More nets of the reproducer's family at 4, 8 and 10 bits (the same graph structure, so the
  compiled bounds are reused): the differential bounds enclose every reached difference."""
  f, fq, box = random_qnn(seed, q)
  assert qb.merge(f, fq, box).paired
  diffs = reached_differences(f, fq, box, uniform=50_000, lattice=20_000, seed=seed)
  for symbolic in (True, False):
    d = qb.bounds.diff(f, fq, box, symbolic=symbolic)
    assert_encloses(d.lower, d.upper, diffs, f"8-16-3 seed {seed} q={q} symbolic={symbolic}")


# --- (c) a P1-style network: 64-100-10 trained on sklearn's digits ----------------------------------

# Held-out digits (the net trains on the first 1500 of 1797) certified by default, and by the sweep.
# At 8 bits the boxes of 1500 and 1502 hold hidden neurons f_q saturates (1500: one always; 1502:
# one always, two sometimes); 1501's holds none, so only the sweep certifies it.
IMAGES = (1500, 1502)
SLOW_IMAGES = (1500, 1501, 1502, 1503, 1504, 1505)
RADIUS = 3  # pixels, L-inf, clipped to [0, 255]


@pytest.fixture(scope="module")
def digits_net():
  """A P1-style MLP (QEBVerif's P1 is 784-100-10 on MNIST; its weights are not shipped): 64-100-10
  ReLU on sklearn's 8x8 digits, pixels 0..16 rescaled to integers 0..255. Full-batch Adam from a
  fixed key in one compiled scan: deterministic on CPU, about two seconds; ~92% held-out accuracy."""
  import optax
  from sklearn.datasets import load_digits

  X, y = load_digits(return_X_y=True)
  X = np.round(X * 255.0 / 16.0).astype(np.float32)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"W1": jax.random.normal(k1, (64, 100)) * np.sqrt(2 / 64), "b1": jnp.zeros(100),
            "W2": jax.random.normal(k2, (100, 10)) * np.sqrt(1 / 100), "b2": jnp.zeros(10)}
  train_x, train_y = jnp.asarray(X[:1500]), jnp.asarray(y[:1500])
  optimizer = optax.adam(1e-2)

  def loss(p):
    logits = jax.vmap(float_net(p))(train_x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()

  @jax.jit
  def train(p):
    def step(carry, _):
      p, state = carry
      updates, state = optimizer.update(jax.grad(loss)(p), state, p)
      return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.lax.scan(step, (p, optimizer.init(p)), None, length=300)
    return p

  params = {k: np.asarray(v, np.float32) for k, v in train(params).items()}
  accuracy = np.mean(np.argmax(np.asarray(jax.vmap(float_net(params))(jnp.asarray(X[1500:]))), 1) == y[1500:])
  assert accuracy > 0.85  # a trained net, whose hidden values do reach the clip (see below)
  return params, X, y


def image_box(X, index):
  x0 = X[index]
  return qb.Box(jnp.asarray(np.clip(x0 - RADIUS, 0, 255)), jnp.asarray(np.clip(x0 + RADIUS, 0, 255)))


def test_digits_net_saturates_and_pairs(digits_net):
  """The case the fix is about occurs: some hidden values pass f_q's top level (the clip saturates),
  and merge() pairs f with every form of f_q at every bit width."""
  params, X, _ = digits_net
  hidden = np.maximum((X[1500:] / 255.0) @ params["W1"] + params["b1"], 0)
  assert np.mean(np.any(hidden > 4.0, axis=1)) > 0.1  # 4 > (2^q - 1) / 2^(q-2) for every q
  # Within the certified boxes: f_q's hidden value before its clip (interval arithmetic, the half
  # of the rounding included) passes the top level 255/64 for some neuron.
  qp, s = quantize_params(params, 8), 2.0 ** 6
  for index in IMAGES:
    box = image_box(X, index)
    upper = (np.maximum(qp["W1"], 0).T @ (np.asarray(box.upper) / 256) + np.minimum(qp["W1"], 0).T
             @ (np.asarray(box.lower) / 256) + qp["b1"] + 0.5 / s)
    assert np.any(upper * s > 2.0 ** 8 - 1), f"digit {index}: no neuron saturates in its box"
  f = float_net(params)
  for q in (4, 8, 10):
    for form in ("literal", "bias", "away"):
      assert qb.merge(f, fixed_point_net(quantize_params(params, q), q, form), image_box(X, 1500)).paired


@pytest.mark.parametrize("q", [4, 8, 10])
def test_fixed_point_forms_agree(digits_net, q):
  """The three forms of f_q are one function on the integer lattice (in float64, where they are
  exact), so the certificates of one hold for the others."""
  params, X, _ = digits_net
  qp = quantize_params(params, q)
  rng = np.random.default_rng(q)
  xs = np.concatenate([X[1500:1600], lattice_points(image_box(X, 1500), 500, rng)]).astype(np.float64)
  zero = lambda x: jnp.zeros(10, x.dtype)
  values = {form: errors64(fixed_point_net(qp, q, form), zero, xs) for form in ("literal", "bias", "away")}
  np.testing.assert_array_equal(values["bias"], values["literal"])
  np.testing.assert_array_equal(values["away"], values["literal"])
  # And the parameters sit on their grids: weights at q-1 fractional bits, biases at q-2.
  for name, frac in (("W1", q - 1), ("W2", q - 1), ("b1", q - 2), ("b2", q - 2)):
    scaled = qp[name].astype(np.float64) * 2.0 ** frac
    assert np.array_equal(scaled, np.round(scaled)), name


def certify_digit(digits_net, index, q, form="literal", lattice=20_000, time_budget=2.0):
  """Certifies one image's box twice (auto on its label, diff on all outputs) and checks both
  against reached differences. Returns ``[(label, upper, reached, seconds)]`` for the report."""
  params, X, y = digits_net
  label = int(y[index])
  f, fq = float_net(params), fixed_point_net(quantize_params(params, q), q, form)
  box = image_box(X, index)
  assert qb.merge(f, fq, box).paired
  diffs = reached_differences(f, fq, box, uniform=0, lattice=lattice, seed=index * 16 + q, outputs=[label])
  rows = []
  runs = [("auto", dict(outputs=[label], time_budget=time_budget), [label]),
          ("diff", dict(method="diff"), list(range(10)))]
  for name, kwargs, outputs in runs:
    start = time.perf_counter()
    cert = qb.certify(f, fq, box, **kwargs)
    seconds = time.perf_counter() - start
    label_ = f"digit {index} q={q} {form} {name}"
    # The certificate's own witness, re-evaluated by the networks (not the merged graph).
    own = errors64(f, fq, np.asarray(cert.witness)[None])
    assert abs(float(np.max(np.abs(own[:, outputs]))) - cert.lower) <= 1e-6 * max(1.0, cert.lower)
    reached = assert_certificate_sound(cert, np.concatenate([diffs, own]), outputs, label_)
    rows.append((label_, cert.upper, reached, seconds))
  return rows


# 16 s an image: the default run certifies one of them.
@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.slow) if i == 1500 else i for i in IMAGES])
def test_digits_certificates_enclose_reached_errors(digits_net, index):
  """QEBVerif's P1 setting at 8 bits, on a P1-style net: every certificate's upper bound is at
  least every error reached on the lattice, the corners and by gradient ascent."""
  for label, upper, reached, seconds in certify_digit(digits_net, index, 8):
    print(f"{label}: upper {upper:.6g} reached {reached:.6g} gap {upper / reached:.3g} ({seconds:.1f} s)")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["bias", "away", "literal"])
@pytest.mark.parametrize("q", [4, 8, 10])
def test_digits_sweep(digits_net, q, form):
  """More images, every bit width, each form of f_q, longer budgets and more lattice points."""
  for index in SLOW_IMAGES:
    for label, upper, reached, seconds in certify_digit(digits_net, index, q, form, lattice=100_000,
                                                        time_budget=5.0):
      print(f"{label}: upper {upper:.6g} reached {reached:.6g} gap {upper / reached:.3g} ({seconds:.1f} s)")
