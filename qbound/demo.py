"""The qbound demo: how far can an 8-, 6- or 4-bit copy of a digits classifier be from the original?

It loads the small digits MLP bundled with qbound (64 -> 32 -> 32 -> 10, ReLU, trained by
``experiments/train_digits_model.py`` on scikit-learn's 8x8 digits), takes an L-inf ball around one
bundled test image (clipped to the pixel range [0, 1]), quantizes the weights uniformly (symmetric,
per tensor) at each bit width and certifies the maximal logit error over the ball. The table shows
the proven upper bound, the error actually reached at a witness image, and their ratio (the gap:
1 means the maximal error is known exactly). ``qbound demo`` on the command line runs it.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Iterable, Optional, TextIO

import numpy as np
from tqdm.auto import tqdm

DIGITS_MODEL = "digits_mlp.nnet"
DIGITS_IMAGES = "digits_test.npz"
DEFAULT_RADIUS = 0.02


def load_digits_model():
  """The bundled digits MLP as ``(apply, params)`` (see :func:`qbound.io.load_nnet`)."""
  from qbound import io  # deferred: the loaders pull in optional readers (ONNX) at import

  return io.load_nnet(io.bundled_path(DIGITS_MODEL))


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
  """The bundled held-out test images, ``(images (n, 64) in [0, 1], labels (n,))``."""
  from qbound import io

  with np.load(io.bundled_path(DIGITS_IMAGES)) as data:
    return np.asarray(data["images"], np.float32), np.asarray(data["labels"], np.int64)


def format_table(rows: list[dict[str, Any]]) -> str:
  """The demo's result rows as an aligned text table (one line per bit width)."""
  lines = [f"{'bits':>4}  {'certified upper':>15}  {'reached lower':>13}  {'gap':>6}  {'seconds':>7}  method"]
  for row in rows:
    lines.append(f"{row['bits']:>4}  {row['upper']:>15.6g}  {row['lower']:>13.6g}  {row['gap']:>6.3g}  "
                 f"{row['seconds']:>7.2f}  {row['method']}")
  return "\n".join(lines)


def run_demo(bits: Iterable[int] = (8, 6, 4), radius: float = DEFAULT_RADIUS, image: int = 0,
             method: str = "auto", progress: bool = True, *, seed: int = 0,
             file: Optional[TextIO] = None) -> list[dict[str, Any]]:
  """Certifies the bundled digits MLP against its quantized copies and prints a table.

  Args:
    bits: the weight bit widths to try (uniform, symmetric, one scale per tensor).
    radius: the L-inf radius of the input box around the image, in pixel units ([0, 1]).
    image: which bundled test image (0 to 19) the box is centred on.
    method: the upper-bound method passed to :func:`qbound.certify` (``auto`` tries them all).
    progress: show a tqdm progress bar (on stderr).
    seed: seed of the PRNG key of the lower-bound search.
    file: where to print the table; ``sys.stdout`` when omitted.

  Returns:
    One dict per bit width with ``bits``, ``upper`` (proven), ``lower`` (reached), ``gap``
    (``upper / lower``), ``seconds``, ``method`` (the method that proved ``upper``) and the full
    ``certificate``.

  Raises:
    ValueError: an image index out of range, a negative or non-finite radius, or an invalid
      bit width or method.

  Example:
    >>> import io
    >>> rows = run_demo(bits=(4,), progress=False, file=io.StringIO())
    >>> rows[0]['bits'], 0 < rows[0]['lower'] <= rows[0]['upper']
    (4, True)
  """
  import jax

  import qbound as qb

  file = sys.stdout if file is None else file
  bits = tuple(bits)
  if not bits:
    raise ValueError("give at least one bit width, e.g. bits=(8, 4).")
  radius = float(radius)
  if not np.isfinite(radius) or radius < 0:
    raise ValueError(f"the radius must be a finite number >= 0, got {radius}.")
  images, labels = load_digits_images()
  if not -len(images) <= image < len(images):
    raise ValueError(f"image must be an index into the {len(images)} bundled test images "
                     f"(0 to {len(images) - 1}), got {image}.")

  apply, params = load_digits_model()
  f = functools.partial(apply, params)
  box = qb.linf_ball(images[image], radius, clip_lower=0.0, clip_upper=1.0)

  print("qbound demo: digits MLP 64-32-32-10 (ReLU) vs. its weight-quantized copies "
        "(uniform, symmetric, per tensor)", file=file)
  print(f"input box: L-inf ball of radius {radius:g} around test image {image} (label {labels[image]}), "
        f"clipped to [0, 1]; error = max |logits - quantized logits|_inf over the box", file=file)
  rows = []
  bar = tqdm(bits, desc="certifying", unit="net", disable=not progress, file=sys.stderr, leave=False)
  for b in bar:
    bar.set_postfix(bits=b)
    start = time.perf_counter()
    # Only the weights are quantized: the input clipping constants are part of the interface.
    qparams = dict(params, params=qb.quantize.uniform(params["params"], bits=b))
    fq = functools.partial(apply, qparams)
    # A 5% gap is plenty for a demo and spares compiling the slower stages of method="auto".
    cert = qb.certify(f, fq, box, method=method, key=jax.random.key(seed), target_gap=0.05)
    rows.append({"bits": int(b), "upper": cert.upper, "lower": cert.lower, "gap": cert.gap,
                 "seconds": time.perf_counter() - start, "method": cert.method, "certificate": cert})
  bar.close()
  print(format_table(rows), file=file)
  print("(seconds include JIT compilation, paid mostly by the first row)", file=file)
  return rows
