"""Activation quantization as a function transform f -> f_q: calibration, fake-quant, DQA.

Weights are quantized offline by the parameter transforms of this package;
activations are produced at inference time, so quantizing them changes the
*function*: `quantize_activations` returns ``f_q(params, x)``, the model with a
k-bit uniform fake-quant inserted after chosen layers,

    q  = clip(round(x / s) + z, qmin, qmax)     the integer code that is stored
    x' = (q - z) * s                            the value the next layer sees

with the scale s (and zero point z) fixed in advance by `calibrate` from the
ranges of the layer's outputs on calibration data (Jacob et al., CVPR 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
Only Inference"). `dqa` gives the important channels of each layer extra
precision at almost no memory cost (Hu, Henderson & Cano 2024, "DQA: An
Efficient Method for Deep Quantization of Deep Neural Network Activations").

Which layers. Two kinds of ``apply_fn`` are supported:

* Flax linen (the default): ``apply_fn(params, x)`` calls a linen module, e.g.
  ``model.apply``. The *outputs of the ``__call__`` of Dense, DenseGeneral,
  Conv, ConvTranspose and Einsum modules* (``layer_types``) are quantized, i.e.
  the pre-activations, found with `flax.linen.intercept_methods`; a layer is
  named by its module path joined by '/', e.g. 'Dense_0', 'layers_2' inside an
  `nn.Sequential`, or 'Block_0/Dense_1'. A module called several times shares
  one range. Activation functions (`nn.relu`) are plain functions, not modules,
  and cannot be intercepted; use the tap form to quantize after them.
  (`capture_intermediates` could record the outputs but not replace them; method
  interception does both with one mechanism, so the recorded and the quantized
  points are the same by construction.)
* Any JAX function, with ``tap=True``: ``apply_fn(params, x, tap)`` calls
  ``h = tap('name', h)`` at each point that may be quantized; `tap` returns its
  value unchanged during calibration and the fake-quantized value in f_q.

`layers` selects among the points by name, with the glob patterns (or a
predicate over the path tuple) of `qbound.quantize.policy`; None takes all.
Every function here is for ONE unbatched input, like the rest of qbound.

The fake-quant is made of ``div``, ``round``, ``add``, ``max``/``min`` and
``mul`` by constants, so qbound's tracer sees a rounding step whose range it
can bound; calibration ranges are constants of f_q, not data-dependent.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qbound.quantize import coding, numerics
from qbound.quantize.policy import Path, PyTree, Where, as_predicate

LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.Einsum)
IMPORTANCE = ('mean_abs', 'sensitivity')
ROOT = '<root>'  # the name of a matched module that is the model itself (empty path)

Hook = Callable[[str, jax.Array], jax.Array]
Bits = Union[int, Mapping[str, int]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActivationRange:
  """The range of one layer's outputs over the calibration inputs.

  Attributes:
    lower: the smallest value seen (a float32 scalar).
    upper: the largest value seen.
  """

  lower: jax.Array
  upper: jax.Array


def _name_path(name: str) -> Path:
  return tuple(name.split('/'))


def _hooked(apply_fn: Callable, tap: bool, layer_types) -> Callable:
  """``run(params, x, hook)``: apply_fn with ``hook(name, value)`` applied at every quantizable point."""
  if not callable(apply_fn):
    raise ValueError(f'apply_fn must be a function, got {apply_fn!r}.')
  if tap:
    return apply_fn
  layer_types = tuple(layer_types)

  def run(params, x, hook):
    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if (context.method_name != '__call__' or not isinstance(context.module, layer_types)
          or not isinstance(out, jax.Array) or not jnp.issubdtype(out.dtype, jnp.floating)):
        return out
      return hook('/'.join(context.module.path) or ROOT, out)

    with nn.intercept_methods(interceptor):
      return apply_fn(params, x)

  return run


def _record(run: Callable, params: PyTree, inputs, predicate) -> dict[str, list[jax.Array]]:
  """The outputs of every selected point on a batch of inputs: name -> [one (n, ...) array per call]."""
  inputs = jnp.asarray(inputs)
  if inputs.ndim < 1 or inputs.shape[0] == 0:
    raise ValueError(f'calibration inputs need a leading batch axis with at least one input, got shape {inputs.shape}.')

  def one(x):
    acts: dict[str, list] = {}

    def hook(name, value):
      if predicate(_name_path(name)):
        acts.setdefault(name, []).append(value)
      return value

    run(params, x, hook)
    return acts

  return jax.jit(jax.vmap(one))(inputs)


def _no_layer_error(tap: bool, layers) -> ValueError:
  if tap:
    return ValueError(f'no tap point matched layers={layers!r}; apply_fn must call tap(name, value).')
  return ValueError(
      f'no layer matched layers={layers!r}. For linen models the outputs of '
      f'{", ".join(t.__name__ for t in LAYER_TYPES)} modules are matched by module path (e.g. "Dense_0"); '
      'for a plain JAX function write it as apply_fn(params, x, tap) and pass tap=True.')


def calibrate(
    apply_fn: Callable,
    params: PyTree,
    inputs,
    *,
    layers: Where = None,
    tap: bool = False,
    layer_types=LAYER_TYPES,
) -> dict[str, ActivationRange]:
  """Records the range [min, max] of each layer's outputs on calibration inputs.

  Min-max calibration (Jacob et al., CVPR 2018): the scale of each layer's
  quantizer is later chosen so that this range is covered.

  Args:
    apply_fn: ``apply_fn(params, x)`` for a linen model, or
      ``apply_fn(params, x, tap)`` with ``tap=True`` (see the module docstring).
    params: the parameters the ranges are measured with.
    inputs: calibration inputs, a batch ``(n, *input_shape)``.
    layers: which layers (glob patterns over the '/'-joined name, or a
      predicate over the name's path tuple); None for all.
    tap: whether `apply_fn` takes a tap function.
    layer_types: linen module classes whose outputs are quantization points.

  Returns:
    ``{layer name: ActivationRange}``.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  >>> params = model.init(jax.random.key(0), jnp.ones(3))
  >>> ranges = calibrate(model.apply, params, jax.random.normal(jax.random.key(1), (16, 3)))
  >>> sorted(ranges), bool(ranges['layers_0'].lower <= ranges['layers_0'].upper)
  (['layers_0', 'layers_2'], True)
  """
  predicate = as_predicate(layers)
  acts = _record(_hooked(apply_fn, tap, layer_types), params, inputs, predicate)
  if not acts:
    raise _no_layer_error(tap, layers)
  return {
      name: ActivationRange(lower=jnp.min(jnp.stack([jnp.min(a) for a in calls])).astype(jnp.float32),
                            upper=jnp.max(jnp.stack([jnp.max(a) for a in calls])).astype(jnp.float32))
      for name, calls in acts.items()
  }


def _check_range(name, r) -> tuple[float, float]:
  if not isinstance(r, ActivationRange):
    raise ValueError(f'range of {name!r} must be an ActivationRange (from calibrate), got {r!r}.')
  lo, hi = float(r.lower), float(r.upper)
  if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
    raise ValueError(f'range of {name!r} is [{lo}, {hi}]; it must be finite with lower <= upper.')
  return lo, hi


def activation_grid(r: ActivationRange, bits: int, *, symmetric: bool = True) -> tuple[float, float, int, int]:
  """The grid covering a calibrated range: ``(scale, zero_point, qmin, qmax)``.

  Symmetric: s = max(|lower|, |upper|) / qmax, z = 0, codes in [-qmax, qmax]
  with qmax = 2^(b-1) - 1. Asymmetric: the range widened to contain 0 split
  into 2^b - 1 steps, s = (hi - lo) / (2^b - 1), z = -round(lo / s), codes in
  [0, 2^b - 1]. A zero range gets s = 1. See `numerics.quantize_int`.

  >>> activation_grid(ActivationRange(jnp.float32(-1.0), jnp.float32(3.5)), 3)
  (1.1666666666666667, 0.0, -3, 3)
  >>> activation_grid(ActivationRange(jnp.float32(0.0), jnp.float32(3.5)), 3, symmetric=False)
  (0.5, 0.0, 0, 7)
  """
  bits = numerics.check_bits(bits, minimum=2)
  lo, hi = _check_range('activation', r)
  qmin, qmax = numerics.int_range(bits, symmetric)
  if symmetric:
    scale = max(abs(lo), abs(hi)) / qmax
    zero_point = 0.0
  else:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin)
  scale = scale if scale > 0 else 1.0
  if not symmetric:
    zero_point = float(qmin - round(lo / scale))
  return scale, zero_point, qmin, qmax


def fake_quant(x: jax.Array, r: ActivationRange, bits: int, *, symmetric: bool = True) -> jax.Array:
  """k-bit fake quantization of x onto the grid of a calibrated range.

  x' = (clip(round(x / s) + z, qmin, qmax) - z) * s with the grid of
  `activation_grid`; values beyond the range saturate at its ends.

  >>> r = ActivationRange(jnp.float32(-1.0), jnp.float32(1.0))
  >>> fake_quant(jnp.array([0.2, -0.6, 5.0]), r, 3).tolist()
  [0.3333333432674408, -0.6666666865348816, 1.0]
  """
  scale, zero_point, qmin, qmax = activation_grid(r, bits, symmetric=symmetric)
  return numerics.quantize_int(x, scale, zero_point, qmin=qmin, qmax=qmax)


def _bits_for(bits: Bits, name: str) -> int:
  if isinstance(bits, Mapping):
    if name not in bits:
      raise ValueError(f'no bit width for layer {name!r}; `bits` has {sorted(bits)}.')
    return bits[name]
  return bits


def _quantizing_hook_fn(grids: Mapping[str, Callable[[jax.Array], jax.Array]], predicate) -> Hook:
  def hook(name, value):
    if not predicate(_name_path(name)):
      return value
    if name not in grids:
      raise ValueError(f'layer {name!r} is selected for quantization but has no calibrated range '
                       f'(ranges cover {sorted(grids)}); calibrate with the same `layers`.')
    return grids[name](value)

  return hook


def quantize_activations(
    apply_fn: Callable,
    ranges: Mapping[str, ActivationRange],
    bits: Bits,
    *,
    layers: Where = None,
    symmetric: bool = True,
    tap: bool = False,
    layer_types=LAYER_TYPES,
) -> Callable:
  """f -> f_q: the model with k-bit uniform fake-quant after the chosen layers.

  Jacob et al., CVPR 2018: each selected layer output x becomes
  x' = (clip(round(x / s) + z, qmin, qmax) - z) * s, the grid fixed from its
  calibrated range (`activation_grid`). The returned function is pure and works
  under `jax.jit` and `jax.vmap`; its weights are whatever params it is called
  with (quantize them with the weight transforms to get a fully quantized net).

  Args:
    apply_fn: as for `calibrate`.
    ranges: ``{layer name: ActivationRange}`` from `calibrate`.
    bits: the bit width, 2 to 24, or ``{layer name: bits}``.
    layers: which layers to quantize; None for every layer in `ranges`.
    symmetric: symmetric grid (z = 0) or asymmetric with a zero point.
    tap: whether `apply_fn` takes a tap function.
    layer_types: linen module classes whose outputs are quantization points.

  Returns:
    ``f_q(params, x)``.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  >>> params = model.init(jax.random.key(0), jnp.ones(3))
  >>> xs = jax.random.normal(jax.random.key(1), (16, 3))
  >>> fq = quantize_activations(model.apply, calibrate(model.apply, params, xs), bits=8)
  >>> bool(jnp.max(jnp.abs(fq(params, xs[0]) - model.apply(params, xs[0]))) < 0.05)
  True
  """
  if not isinstance(ranges, Mapping) or not ranges:
    raise ValueError('ranges must be a non-empty dict {layer name: ActivationRange}, as returned by calibrate.')
  predicate = as_predicate(layers) if layers is not None else (lambda path: '/'.join(map(str, path)) in ranges)
  grids = {}
  for name, r in ranges.items():
    scale, zero_point, qmin, qmax = activation_grid(r, _bits_for(bits, name), symmetric=symmetric)
    grids[name] = (lambda s, z, lo, hi: lambda v: numerics.quantize_int(v, s, z, qmin=lo, qmax=hi))(
        scale, zero_point, qmin, qmax)
  run = _hooked(apply_fn, tap, layer_types)
  hook = _quantizing_hook_fn(grids, predicate)

  def fq(params, x):
    return run(params, x, hook)

  return fq


# --------------------------------------------------------------------------------------------------
# DQA


@dataclasses.dataclass(frozen=True)
class DQALayer:
  """The DQA choices and memory of one layer.

  Attributes:
    name: the layer's name.
    channels: number of channels (the last axis of its output).
    important: indices of the channels quantized with extra bits.
    values_per_input: activation values the layer produces per input (all calls).
    important_values_per_input: those in important channels.
    activation_bits: bits * values_per_input, the storage of the b-bit codes.
    shift_error_bits: Huffman-coded bits of the shift errors per input,
      averaged over the calibration inputs (code table not counted).
    fixed_shift_error_bits: extra_bits * important_values_per_input, the same
      errors stored without coding.
  """

  name: str
  channels: int
  important: tuple[int, ...]
  values_per_input: int
  important_values_per_input: int
  activation_bits: int
  shift_error_bits: float
  fixed_shift_error_bits: int


@dataclasses.dataclass(frozen=True)
class DQAReport:
  """The extra activation memory DQA's coded shift errors cost, per input.

  Attributes:
    layers: one `DQALayer` per quantized layer.
    bits: target bit width b.
    extra_bits: m, the extra bits of important channels.
    importance: how channels were ranked.
    num_inputs: calibration inputs the Huffman codes were built from.
  """

  layers: tuple[DQALayer, ...]
  bits: int
  extra_bits: int
  importance: str
  num_inputs: int

  @property
  def activation_bits(self) -> int:
    """Bits of the b-bit activation codes of all layers, per input."""
    return sum(l.activation_bits for l in self.layers)

  @property
  def extra_bits_per_input(self) -> float:
    """Huffman-coded shift-error bits of all layers, per input: DQA's memory overhead."""
    return sum(l.shift_error_bits for l in self.layers)

  @property
  def fixed_extra_bits_per_input(self) -> int:
    """The shift errors stored in m bits each, without Huffman coding."""
    return sum(l.fixed_shift_error_bits for l in self.layers)

  @property
  def overhead(self) -> float:
    """extra_bits_per_input / activation_bits."""
    return self.extra_bits_per_input / self.activation_bits if self.activation_bits else 0.0


def shift_split(codes: np.ndarray, extra_bits: int) -> tuple[np.ndarray, np.ndarray]:
  """DQA's right shift of (b+m)-bit codes: ``(high, error)`` with codes = high * 2^m + error.

  `high` (the arithmetic right shift by m, i.e. floor(q / 2^m)) is the b-bit
  code stored as the activation; `error` (the low m bits, in [0, 2^m)) is the
  shift error, Huffman coded and added back at de-quantization.

  >>> high, err = shift_split(np.array([13, -13, 7]), 2)
  >>> high.tolist(), err.tolist()
  ([3, -4, 1], [1, 3, 3])
  """
  codes = np.asarray(codes, np.int64)
  high = np.right_shift(codes, extra_bits)
  return high, codes - np.left_shift(high, extra_bits)


def _channel_importance(run, params, inputs, acts, grids_direct, importance) -> dict[str, np.ndarray]:
  if importance == 'mean_abs':
    return {name: np.asarray(jnp.mean(jnp.concatenate(
        [jnp.abs(a).reshape(-1, a.shape[-1]) for a in calls]), axis=0)) for name, calls in acts.items()}
  # 'sensitivity': one channel at a time, the mean squared output error it alone causes when quantized
  # directly to b bits (the rest of the network in float), on the calibration inputs.
  inputs = jnp.asarray(inputs)
  reference = jax.vmap(lambda x: run(params, x, lambda name, v: v))(inputs)
  scores = {}
  for layer, calls in acts.items():
    channels = calls[0].shape[-1]

    def error(mask, layer=layer):
      def hook(name, v):
        return v + mask.astype(v.dtype) * (grids_direct[name](v) - v) if name == layer else v

      out = jax.vmap(lambda x: run(params, x, hook))(inputs)
      return jnp.mean(jnp.square(out - reference))

    scores[layer] = np.asarray(jax.jit(jax.vmap(error))(jnp.eye(channels, dtype=jnp.float32)))
  return scores


def dqa(
    apply_fn: Callable,
    params: PyTree,
    calib,
    bits: int,
    extra_bits: int,
    important_fraction: float,
    *,
    layers: Where = None,
    importance: str = 'mean_abs',
    symmetric: bool = True,
    tap: bool = False,
    layer_types=LAYER_TYPES,
) -> tuple[Callable, DQAReport]:
  """DQA: important channels get m extra bits whose shift errors are Huffman coded.

  Hu, Henderson & Cano 2024, "DQA: An Efficient Method for Deep Quantization
  of Deep Neural Network Activations" (arXiv:2412.09687). Per layer, on
  calibration data:

  1. Rank channels (the last axis) by importance and call the top
     ceil(important_fraction * C) important. ``importance='mean_abs'`` ranks by
     the mean |activation| (a cheap proxy); ``'sensitivity'`` ranks by the
     mean squared network-output error caused by quantizing that channel alone
     directly to b bits, a one-channel-at-a-time search in the spirit of the
     paper's offline search (which ranks channels by their effect on accuracy).
  2. Unimportant channels: direct b-bit quantization on the layer's grid.
  3. Important channels: quantized to b + m bits on the same range, then the
     code q is right-shifted by m: the b-bit ``q >> m`` is stored as the
     activation and the shift error ``q - (q >> m) * 2^m`` (m bits) is
     Huffman coded (`qbound.quantize.coding`). De-quantization adds the error
     back, so the value is q * s_{b+m}: f_q computes exactly that, as a
     fake-quant with a per-channel step (`shift_split` gives the stored parts).

  The report counts, per input, the Huffman-coded shift-error bits over the
  calibration inputs (one code per layer, built from them; code tables not
  counted, as in `coding.size_report`) against the b-bit activation codes.

  Args:
    apply_fn: as for `calibrate`.
    params: the parameters used for calibration and importance.
    calib: calibration inputs, a batch ``(n, *input_shape)``.
    bits: target bit width b, 2 to 23.
    extra_bits: m >= 1, with b + m <= 24.
    important_fraction: fraction of channels per layer given extra bits, in [0, 1].
    layers: which layers to quantize (None: all quantization points).
    importance: 'mean_abs' or 'sensitivity'.
    symmetric: symmetric grids (z = 0) or asymmetric with a zero point.
    tap: whether `apply_fn` takes a tap function.
    layer_types: linen module classes whose outputs are quantization points.

  Returns:
    ``(f_q, report)``: ``f_q(params, x)`` and a `DQAReport`.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  >>> params = model.init(jax.random.key(0), jnp.ones(3))
  >>> xs = jax.random.normal(jax.random.key(1), (32, 3))
  >>> fq, report = dqa(model.apply, params, xs, bits=3, extra_bits=2, important_fraction=0.25)
  >>> [len(l.important) for l in report.layers], report.activation_bits
  ([2, 1], 30)
  >>> report.extra_bits_per_input <= report.fixed_extra_bits_per_input == 2 * (2 + 1)
  True
  """
  bits = numerics.check_bits(bits, minimum=2, maximum=numerics.MAX_INT_BITS - 1)
  extra_bits = numerics.check_bits(
      extra_bits, minimum=1, maximum=numerics.MAX_INT_BITS - bits, what='extra_bits',
      why=f' (bits + extra_bits at most {numerics.MAX_INT_BITS}, the integers float32 holds exactly; bits={bits})')
  if isinstance(important_fraction, bool) or not isinstance(important_fraction, (int, float)) or not (
      0.0 <= important_fraction <= 1.0):
    raise ValueError(f'important_fraction must be a number in [0, 1], got {important_fraction!r}.')
  if importance not in IMPORTANCE:
    raise ValueError(f'unknown importance {importance!r}; choose one of {IMPORTANCE}.')

  run = _hooked(apply_fn, tap, layer_types)
  predicate = as_predicate(layers)
  acts = _record(run, params, calib, predicate)
  if not acts:
    raise _no_layer_error(tap, layers)
  ranges = {name: ActivationRange(jnp.min(jnp.stack([jnp.min(a) for a in calls])),
                                  jnp.max(jnp.stack([jnp.max(a) for a in calls]))) for name, calls in acts.items()}
  num_inputs = int(jnp.asarray(calib).shape[0])

  direct_grids = {}
  for name, r in ranges.items():
    s, z, lo, hi = activation_grid(r, bits, symmetric=symmetric)
    direct_grids[name] = (lambda s, z, lo, hi: lambda v: numerics.quantize_int(v, s, z, qmin=lo, qmax=hi))(s, z, lo, hi)
  scores = _channel_importance(run, params, calib, acts, direct_grids, importance)

  grids, report_layers = {}, []
  for name, calls in acts.items():
    channels = calls[0].shape[-1]
    k = math.ceil(important_fraction * channels)
    important = np.sort(np.argsort(-scores[name], kind='stable')[:k])
    mask = np.zeros(channels, bool)
    mask[important] = True
    s_b, z_b, lo_b, hi_b = activation_grid(ranges[name], bits, symmetric=symmetric)
    s_e, z_e, lo_e, hi_e = activation_grid(ranges[name], bits + extra_bits, symmetric=symmetric)
    # Per-channel grid constants: the important channels on the (b+m)-bit grid.
    scale = np.where(mask, s_e, s_b).astype(np.float32)
    zero = np.where(mask, z_e, z_b).astype(np.float32)
    qmin = np.where(mask, lo_e, lo_b).astype(np.float32)
    qmax = np.where(mask, hi_e, hi_b).astype(np.float32)
    grids[name] = (lambda s, z, lo, hi: lambda v: _fake_quant_channels(v, s, z, lo, hi))(scale, zero, qmin, qmax)

    # Memory: the shift errors of the important channels on the calibration inputs.
    values = sum(int(np.prod(a.shape[1:])) for a in calls)
    per_channel = values // channels
    errors = []
    for a in calls:
      x = np.asarray(a, np.float32)[..., mask].astype(np.float64)
      codes = np.clip(np.round(x / s_e) + z_e, lo_e, hi_e).astype(np.int64)
      high, err = shift_split(codes, extra_bits)
      assert np.array_equal(high * 2**extra_bits + err, codes)  # the error added back restores the code
      errors.append(err.ravel())
    errors = np.concatenate(errors) if errors else np.zeros(0, np.int64)
    coded = _huffman_bits(errors)
    report_layers.append(DQALayer(
        name=name, channels=channels, important=tuple(int(i) for i in important), values_per_input=values,
        important_values_per_input=per_channel * len(important), activation_bits=bits * values,
        shift_error_bits=coded / num_inputs, fixed_shift_error_bits=extra_bits * per_channel * len(important)))

  hook = _quantizing_hook_fn(grids, predicate)

  def fq(params, x):
    return run(params, x, hook)

  report = DQAReport(layers=tuple(report_layers), bits=bits, extra_bits=extra_bits, importance=importance,
                     num_inputs=num_inputs)
  return fq, report


def _huffman_bits(symbols: np.ndarray) -> int:
  """Bits of a stream of integer symbols under its own Huffman code (`coding.huffman_code_lengths`)."""
  if symbols.size == 0:
    return 0
  values, counts = np.unique(symbols, return_counts=True)
  lengths = coding.huffman_code_lengths(dict(zip(values.tolist(), counts.tolist())))
  return int(sum(int(c) * lengths[v] for v, c in zip(values.tolist(), counts.tolist())))


def _fake_quant_channels(v: jax.Array, scale, zero, qmin, qmax) -> jax.Array:
  """numerics.quantize_int with per-channel (last-axis) code ranges."""
  dt = numerics.compute_dtype(v.dtype)
  s, z = jnp.asarray(scale, dt), jnp.asarray(zero, dt)
  q = jnp.clip(jnp.round(v.astype(dt) / s) + z, jnp.asarray(qmin, dt), jnp.asarray(qmax, dt))
  return ((q - z) * s).astype(v.dtype)
