"""The sisl NNet text format: fully connected ReLU networks as ``(apply, params)``.

The format (Kyle Julian, Stanford 2016; github.com/sisl/NNet; used for ACAS Xu by Katz et al.,
Reluplex, CAV 2017, and for the ReluDiff/NeuroDiff benchmarks) is plain text:

```
// comment lines (licence notices live here)
numLayers,numInputs,numOutputs,maxLayerSize,
size_0,size_1,...,size_numLayers,          (size_0 = numInputs, size_numLayers = numOutputs)
flag line (unused)
input mins            (numInputs values)
input maxes           (numInputs values)
means                 (numInputs values, then the output's)
ranges                (numInputs values, then the output's)
per layer: size_{k+1} lines of size_k weights (the out x in matrix, one row per line),
           then size_{k+1} lines of one bias each
```

The network is ``y = L_n(relu(... relu(L_1(z))))`` with ``L_k(h) = W_k h + b_k`` and the input
normalised as ``z = (clip(x, mins, maxes) - means) / ranges``; the output is used as it is
(the output mean and range are kept in params, but not applied).

Params follow the ``flax.linen.Dense`` layout so qbound's quantizers work unchanged:

```
{'params':        {'dense_0': {'kernel': (in, out), 'bias': (out,)}, ..., 'dense_{n-1}': ...},
 'normalisation': {'mins', 'maxes', 'means', 'ranges': (numInputs,),
                   'output_mean', 'output_range': ()}}
```

Quantize ``params['params']`` only: the normalisation constants are part of the input
interface, not weights, which is why none of them is called ``kernel`` or ``bias``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qbound import validate

Params = dict[str, Any]
PathLike = str | os.PathLike


def apply_nnet(params: Params, x: jax.Array) -> jax.Array:
  """The forward pass of an NNet network for one unbatched input.

  Args:
    params: as returned by `load_nnet`: ``params['params']['dense_k']`` holds ``kernel``
      (in, out) and ``bias`` (out,); ``params['normalisation']`` the input normalisation.
    x: one raw (not normalised) input of shape ``(numInputs,)``.

  Returns:
    The ``(numOutputs,)`` output: ReLU after every layer but the last, outputs not
    de-normalised.

  Example:
    >>> from qbound.io import bundled_path, load_nnet
    >>> _, params = load_nnet(bundled_path('ACASXU_run2a_1_1_batch_2000.nnet'))
    >>> apply_nnet(params, jnp.array([60000.0, 0.1, -0.2, 1150.0, 50.0])).shape
    (5,)
  """
  norm = params["normalisation"]
  x = jnp.asarray(x, dtype=norm["mins"].dtype)
  if x.shape != norm["mins"].shape:
    raise ValueError(
        f'the network takes one input of shape {norm["mins"].shape}, got shape {x.shape}; '
        "use jax.vmap to run a batch")
  # Divide rather than multiply by 1/range so that the float32 result matches the C reference.
  h = (jnp.clip(x, norm["mins"], norm["maxes"]) - norm["means"]) / norm["ranges"]
  layers = params["params"]
  for k in range(len(layers)):
    layer = layers[f"dense_{k}"]
    h = h @ layer["kernel"] + layer["bias"]
    if k < len(layers) - 1:
      h = jax.nn.relu(h)
  return h


def read_nnet_header(path: PathLike) -> list[str]:
  """The ``//`` comment lines at the top of an NNet file, so their notices can be kept.

  Args:
    path: the ``.nnet`` file.

  Returns:
    The comment lines as written (with their ``//``, without the line break); pass them to
    ``save_nnet(..., header=...)`` to write them back unchanged.

  Example:
    >>> from qbound.io import bundled_path
    >>> read_nnet_header(bundled_path('ACASXU_run2a_1_1_batch_2000.nnet'))[0]
    '// The contents of this file are licensed under the Creative Commons'
  """
  header = []
  for number, line in enumerate(_read_text(path).splitlines(), start=1):
    if not line.lstrip().startswith("//"):
      break
    if "\x00" in line:
      _check_text(os.fspath(path), number, line)
    # A comment that is not UTF-8 is most likely Latin-1 (where every byte is a character): read
    # it so, to be written back as UTF-8 by save_nnet.
    header.append(line.encode("utf-8", "surrogateescape").decode("latin-1") if _escaped(line) else line)
  return header


def load_nnet(path: PathLike) -> tuple[Callable[[Params, jax.Array], jax.Array], Params]:
  """Read an NNet file as a pure JAX function of one input and its float32 params.

  Numbers are read as float64 and rounded once to float32. Normalisation lines may carry
  more values than the format asks for (ReluDiff's ACAS Xu copies give 7 input entries for 5
  inputs): the first ``numInputs`` are the inputs' and the last of the means and ranges lines
  is the output's, as in the original Reluplex copies, and the rest is ignored. Infinite mins
  and maxes (HAR.nnet) are kept: ``clip`` with them is exact.

  Args:
    path: the ``.nnet`` file.

  Returns:
    ``(apply, params)``: ``apply(params, x)`` is `apply_nnet`; params as described in the
    module docstring. ``functools.partial(apply, params)`` is the network.

  Raises:
    ValueError: the file is not text (binary, or not UTF-8 outside its comments), is truncated,
      has wrong counts, non-numeric or non-finite weights; the message names the file, the line
      and what was expected there.
    OSError: the file cannot be opened (missing, a directory, no permission).

  Example:
    >>> from qbound.io import bundled_path
    >>> apply, params = load_nnet(bundled_path('ACASXU_run2a_1_1_batch_2000.nnet'))
    >>> params['params']['dense_0']['kernel'].shape, len(params['params'])
    ((5, 50), 7)
    >>> apply(params, jnp.zeros(5)).dtype
    dtype('float32')
  """
  path = os.fspath(path)
  lines = _Lines(path, _read_text(path))
  num_layers, num_inputs, num_outputs, _ = lines.ints("numLayers,numInputs,numOutputs,maxLayerSize", 4)
  if num_layers < 1 or num_inputs < 1 or num_outputs < 1:
    lines.fail("numLayers, numInputs and numOutputs must all be positive")
  sizes = lines.ints(f"the {num_layers + 1} layer sizes (numLayers + 1)", num_layers + 1)
  if sizes[0] != num_inputs or sizes[-1] != num_outputs or min(sizes) < 1:
    lines.fail(f"layer sizes {sizes} must be positive, start with numInputs={num_inputs} and "
               f"end with numOutputs={num_outputs}")
  lines.next("the flag line")  # unused by every reader; its content is not checked

  mins = lines.floats(f"{num_inputs} input mins", num_inputs, extra_ok=True)
  if np.isnan(mins).any():
    lines.fail("input mins and maxes must be numbers or +-inf, found nan")
  maxes = lines.floats(f"{num_inputs} input maxes", num_inputs, extra_ok=True)
  if np.isnan(maxes).any():
    lines.fail("input mins and maxes must be numbers or +-inf, found nan")
  means = _used(lines.floats(f"{num_inputs + 1} means (inputs, then output)", num_inputs + 1,
                             extra_ok=True), num_inputs)
  _check_finite(lines, means, "means")
  ranges = _used(lines.floats(f"{num_inputs + 1} ranges (inputs, then output)", num_inputs + 1,
                              extra_ok=True), num_inputs)
  _check_finite(lines, ranges, "ranges")
  if np.any(ranges == 0):
    lines.fail("a range is 0, so normalising by it would divide by zero")

  layers = {}
  for k in range(num_layers):
    n_in, n_out = sizes[k], sizes[k + 1]
    rows = []
    for j in range(n_out):
      what = f"{n_in} weights: row {j} of the {n_out}x{n_in} matrix of layer {k}"
      rows.append(_check_finite(lines, lines.floats(what, n_in), "weights"))
    biases = []
    for j in range(n_out):
      what = f"one bias: bias {j} of the {n_out} of layer {k}"
      biases.append(_check_finite(lines, lines.floats(what, 1), "biases")[0])
    layers[f"dense_{k}"] = {"kernel": jnp.asarray(np.stack(rows).T),
                            "bias": jnp.asarray(np.stack(biases))}
  lines.expect_end()

  normalisation = {
      "mins": jnp.asarray(_to_float32(mins[:num_inputs])),
      "maxes": jnp.asarray(_to_float32(maxes[:num_inputs])),
      "means": jnp.asarray(_to_float32(means[:num_inputs])),
      "ranges": jnp.asarray(_to_float32(ranges[:num_inputs])),
      "output_mean": jnp.asarray(_to_float32(means[-1])),
      "output_range": jnp.asarray(_to_float32(ranges[-1])),
  }
  return apply_nnet, {"params": layers, "normalisation": normalisation}


def save_nnet(path: PathLike, params: Params, *, header: Iterable[str] = ()) -> None:
  """Write a fully connected ReLU network in the NNet format.

  Each float32 value is written in the shortest text that reads back (as float64, then
  float32) to the same float32, so ``load_nnet(save_nnet(...))`` gives identical params.

  Args:
    path: the ``.nnet`` file to write (overwritten).
    params: ``{'params': {name: {'kernel': (in, out), 'bias': (out,)}}}`` ordered by the
      number that ends each name (``dense_0``, ``Dense_1``, ...; ``flax.linen.Dense``
      names work), plus optionally ``'normalisation'`` as `load_nnet` returns it. Without
      it the input is not normalised (mins/maxes at the float32 limits, means 0, ranges 1).
    header: comment lines written first; lines not starting with ``//`` get ``// ``.
      Pass `read_nnet_header` of the source file to keep its licence notice.

  Raises:
    ValueError: the params are not a chain of dense layers the format can hold.

  Example:
    >>> import tempfile
    >>> from qbound.io import bundled_path
    >>> src = bundled_path('ACASXU_run2a_1_1_batch_2000.nnet')
    >>> _, params = load_nnet(src)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     save_nnet(f'{tmp}/copy.nnet', params, header=read_nnet_header(src))
    ...     _, again = load_nnet(f'{tmp}/copy.nnet')
    >>> bool((again['params']['dense_6']['bias'] == params['params']['dense_6']['bias']).all())
    True
  """
  kernels, biases = _dense_chain(params)
  sizes = [kernels[0].shape[0]] + [k.shape[1] for k in kernels]
  n_in = sizes[0]
  norm = params.get("normalisation")
  if norm is None:
    big = np.finfo(np.float32).max
    norm = {"mins": np.full(n_in, -big), "maxes": np.full(n_in, big),
            "means": np.zeros(n_in), "ranges": np.ones(n_in)}
  vectors = {}
  for name in ("mins", "maxes", "means", "ranges"):
    if name not in norm:
      raise ValueError(f"params['normalisation'] has no {name!r}")
    vectors[name] = np.asarray(norm[name], np.float32).reshape(-1)
    if vectors[name].shape != (n_in,):
      raise ValueError(f"params['normalisation'][{name!r}] has {vectors[name].size} values, "
                       f"the first layer has {n_in} inputs")
    if name in ("means", "ranges") and not np.isfinite(vectors[name]).all():
      raise ValueError(f"params['normalisation'][{name!r}] must be finite float32 numbers (load_nnet refuses "
                       f"others), got {vectors[name].tolist()}")
  out_mean = np.asarray(norm.get("output_mean", 0.0), np.float32).reshape(1)
  out_range = np.asarray(norm.get("output_range", 1.0), np.float32).reshape(1)

  out = []
  for line in header:
    if "\n" in line or "\r" in line:
      raise ValueError(f"header lines must not contain line breaks: {line!r}")
    out.append(line if line.lstrip().startswith("//") else f"// {line}")
  out.append(f"{len(kernels)},{n_in},{sizes[-1]},{max(sizes)},")
  out.append(",".join(map(str, sizes)) + ",")
  out.append("0,")
  out.append(_row(vectors["mins"]))
  out.append(_row(vectors["maxes"]))
  out.append(_row(np.concatenate([vectors["means"], out_mean])))
  out.append(_row(np.concatenate([vectors["ranges"], out_range])))
  for kernel, bias in zip(kernels, biases):
    out.extend(_row(row) for row in kernel.T)
    out.extend(f"{text}," for text in _format(bias))
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")


def _read_text(path: PathLike) -> str:
  """The file's text. Bytes that are not UTF-8 are kept as surrogate escapes instead of failing the
  whole read, so that a comment in Latin-1 (a licence notice with an accent) is no error, and a
  data line holding such bytes is refused by `_check_text` naming its line."""
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    return f.read()


def _escaped(line: str) -> bool:
  return any("\udc80" <= ch <= "\udcff" for ch in line)


def _check_text(path: str, number: int, line: str) -> None:
  """Raises ``ValueError`` naming the file and line if ``line`` holds bytes that are not text."""
  bad = next((i for i, ch in enumerate(line) if "\udc80" <= ch <= "\udcff" or ch == "\x00"), None)
  if bad is None:
    return
  ch = line[bad]
  byte = ord(ch) - 0xDC00 if ch != "\x00" else 0
  raise ValueError(f"{path}, line {number}: not a text NNet file: byte 0x{byte:02x} at column {bad + 1} is not "
                   "UTF-8 text (a binary file, or one in another encoding or format: .nnet files are plain "
                   "text; ONNX models are read by qbound.io.load_onnx).")


class _Lines:
  """The data lines of an NNet file, read in order, remembering line numbers for errors."""

  def __init__(self, path: str, text: str):
    self.path = path
    self._rows = [(number, line) for number, line in enumerate(text.splitlines(), start=1)
                  if line.strip() and not line.lstrip().startswith("//")]
    for number, line in self._rows:
      _check_text(path, number, line)
    self._lines_in_file = len(text.splitlines())
    # A file cut off inside its last number still parses ('0.0883' cut to '0.'); NNet writers end
    # every data line with a comma and a line break, so one without either betrays the cut.
    commas = [line.rstrip().endswith(",") for _, line in self._rows]
    self._cut = bool(commas) and not text.endswith(("\n", "\r")) and not commas[-1] and all(commas[:-1])
    self._pos = 0
    self.line = 0  # the number of the line read last, for messages

  def fail(self, message: str):
    raise ValueError(f"{self.path}, line {self.line}: {message}")

  def next(self, what: str) -> list[str]:
    if self._pos == len(self._rows):
      raise ValueError(
          f"{self.path}: the file ends (after line {self._lines_in_file}) where {what} was expected; "
          "it is truncated, or its header promises more layers or neurons than it holds")
    self.line, text = self._rows[self._pos]
    self._pos += 1
    return [token.strip() for token in text.split(",") if token.strip()]

  def floats(self, what: str, count: int, *, extra_ok: bool = False) -> np.ndarray:
    tokens = self.next(what)
    if len(tokens) < count or (len(tokens) > count and not extra_ok):
      self.fail(f"expected {what}, found {len(tokens)} value(s)")
    # float() reads '1_0' as 10 and non-ASCII digits; the C reader's atof does not: refuse them.
    if all(t.isascii() and "_" not in t for t in tokens):
      try:
        return np.array(tokens, dtype=np.float64)
      except ValueError:
        pass
    bad = next((t for t in tokens if "_" in t or not t.isascii() or not validate.is_number(t)), tokens[0])
    self.fail(f"{bad[:40]!r} is not a number (expected {what})")

  def ints(self, what: str, count: int) -> list[int]:
    tokens = self.next(what)
    if len(tokens) != count:
      self.fail(f"expected {what}, found {len(tokens)} value(s)")
    # ASCII digits only, as the C reader's atoi reads them (int() would take '1_0' or Arabic digits),
    # and few enough of them to be a size at all (int() refuses over 4300 digits with its own error).
    bad = next((t for t in tokens if not re.fullmatch(r"[+-]?[0-9]{1,18}", t)), None)
    if bad is not None:
      self.fail(f"{bad[:40]!r} is not an integer (expected {what})")
    return [int(t) for t in tokens]

  def expect_end(self):
    if self._cut:
      self.line = self._rows[-1][0]
      self.fail("the file is cut off in this line: it has no trailing comma and no line break, unlike every "
                "other line, so its last number may be incomplete; the file is truncated")
    if self._pos < len(self._rows):
      self.line = self._rows[self._pos][0]
      self.fail("unexpected data after the last bias of the last layer; the header "
                "promises fewer layers or neurons than the file holds")


def _used(values: np.ndarray, num_inputs: int) -> np.ndarray:
  """The inputs' entries and the output's (the last) of a means or ranges line."""
  return np.concatenate([values[:num_inputs], values[-1:]])


def _check_finite(lines: _Lines, values: np.ndarray, what: str) -> np.ndarray:
  """float32 copies of values that must be finite numbers in float32 (weights, means, ...)."""
  with np.errstate(over="ignore"):
    values32 = values.astype(np.float32)
  if not np.isfinite(values32).all():
    bad = float(values[~np.isfinite(values32)][0])
    lines.fail(f"{what} must be finite float32 numbers, found {bad!r}")
  return values32


def _to_float32(values) -> np.ndarray:
  # Mins and maxes beyond the float32 range (the 'no bound' idiom) become infinite: clip is exact.
  with np.errstate(over="ignore"):
    return np.asarray(values, np.float64).astype(np.float32)


def _format(values) -> list[str]:
  """Shortest decimal text of each float32 that reads back, through float64, to itself."""
  values = np.asarray(values, np.float32).reshape(-1)
  texts = [str(v) for v in values]
  with np.errstate(over="ignore"):
    back = np.array(texts, dtype=np.float64).astype(np.float32)
  # Double rounding (text -> float64 -> float32) can in rare cases miss; 9 digits never do.
  for i in np.flatnonzero((back != values) & ~(np.isnan(back) & np.isnan(values))):
    texts[i] = f"{float(values[i]):.9g}"
  return texts


def _row(values) -> str:
  return ",".join(_format(values)) + ","


def _dense_chain(params: Params) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The kernels and biases of params['params'], in layer order, checked to form a chain."""
  if not isinstance(params, Mapping) or not isinstance(params.get("params"), Mapping):
    raise ValueError("params must be a dict with a 'params' entry of dense layers, "
                     "{'params': {'dense_0': {'kernel': ..., 'bias': ...}, ...}}")
  layers = params["params"]

  def index(name):
    match = re.search(r"(\d+)$", name)
    if match is None:
      raise ValueError(f"cannot order layer {name!r}: layer names must end in their index "
                       "('dense_0', 'dense_1', ...)")
    return int(match.group(1))

  names = sorted(layers, key=index)
  if not names:
    raise ValueError("params['params'] holds no layers")
  kernels, biases = [], []
  for name in names:
    layer = layers[name]
    if not isinstance(layer, Mapping) or set(layer) != {"kernel", "bias"}:
      raise ValueError(f"layer {name!r} must hold exactly 'kernel' and 'bias', "
                       f"found {sorted(layer) if isinstance(layer, Mapping) else layer!r}")
    kernel = np.asarray(layer["kernel"], np.float32)
    bias = np.asarray(layer["bias"], np.float32)
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
      raise ValueError(f"layer {name!r}: kernel must be (in, out) and bias (out,), "
                       f"got {kernel.shape} and {bias.shape}")
    for what, values in (("kernel", kernel), ("bias", bias)):
      if not np.isfinite(values).all():  # (load_nnet refuses such a file: never write one)
        raise ValueError(f"layer {name!r}: its {what} holds {float(values[~np.isfinite(values)][0])}; the NNet format "
                         "holds finite float32 numbers only (load_nnet refuses others).")
    if kernels and kernels[-1].shape[1] != kernel.shape[0]:
      raise ValueError(f"layer {name!r} takes {kernel.shape[0]} inputs but the layer before "
                       f"gives {kernels[-1].shape[1]}")
    kernels.append(kernel)
    biases.append(bias)
  return kernels, biases
