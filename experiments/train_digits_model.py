"""Trains the small digits MLP that ships with qbound for the demo, the CLI and the tests.

A Flax linen MLP 64 -> 32 -> 32 -> 10 (ReLU) is trained with Adam on scikit-learn's bundled
8x8 digits (``sklearn.datasets.load_digits``, BSD-3-Clause; originally the UCI "Optical
Recognition of Handwritten Digits" data set), pixels scaled to [0, 1] by dividing by 16. The split
and the minibatch order come from fixed seeds and the weights from an explicit PRNG key, so a rerun
on CPU gives the same network. It writes

* ``qbound/data/digits_mlp.nnet``: the network in the NNet format (input box [0, 1]^64, no
  normalisation), with header comments saying what it is and where it comes from;
* ``qbound/data/digits_test.npz``: the first ``--num-test-images`` held-out test images
  (``images``, float32, shape (n, 64), in [0, 1]) and their ``labels``.

Run from the repository root::

    python experiments/train_digits_model.py            # about 5 s on 2 CPU cores
    python experiments/train_digits_model.py --smoke    # a few epochs, writes to a temp dir
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from qbound.io import load_nnet, save_nnet

HIDDEN = (32, 32)
NUM_CLASSES = 10
DATA_DIR = pathlib.Path(__file__).resolve().parents[1] / "qbound" / "data"


class MLP(nn.Module):
  """ReLU MLP; layers are named Dense_0, Dense_1, ... which `save_nnet` orders by their index."""

  hidden: tuple[int, ...] = HIDDEN
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def split_digits(test_fraction: float = 0.25, seed: int = 0):
  """The digits data in [0, 1] with a fixed train/test split: ``(x_train, y_train, x_test, y_test)``."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  num_test = int(round(test_fraction * len(x)))
  test, train = order[:num_test], order[num_test:]
  return x[train], y[train], x[test], y[test]


def train(key, x_train, y_train, *, epochs: int, batch_size: int = 64, learning_rate: float = 3e-3):
  """Adam on the softmax cross-entropy; returns the linen variables ``{'params': ...}``."""
  model = MLP()
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  init_key, shuffle_key = jax.random.split(key)
  variables = model.init(init_key, jnp.zeros(x_train.shape[1]))
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(variables)

  def loss_fn(variables, xb, yb):
    logits = jax.vmap(functools.partial(model.apply, variables))(xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def epoch(carry, perm_key):
    variables, opt_state = carry
    # Drop the ragged last batch so every step has the same shape (one compilation).
    num_batches = x_train.shape[0] // batch_size
    perm = jax.random.permutation(perm_key, x_train.shape[0])[: num_batches * batch_size]
    batches = perm.reshape(num_batches, batch_size)

    def step(carry, idx):
      variables, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(variables, x_train[idx], y_train[idx])
      updates, opt_state = optimizer.update(grads, opt_state, variables)
      return (optax.apply_updates(variables, updates), opt_state), loss

    (variables, opt_state), losses = jax.lax.scan(step, (variables, opt_state), batches)
    return (variables, opt_state), losses.mean()

  carry = (variables, opt_state)
  for k in jax.random.split(shuffle_key, epochs):
    carry, _ = epoch(carry, k)
  return carry[0]


def accuracy(apply, params, x, y) -> float:
  logits = jax.vmap(functools.partial(apply, params))(jnp.asarray(x))
  return float(jnp.mean(jnp.argmax(logits, axis=-1) == y))


def header_lines(test_accuracy: float, num_train: int, num_test: int, epochs: int) -> list[str]:
  return [
      "// qbound demo network: digits MLP 64-32-32-10 (ReLU), written by experiments/train_digits_model.py",
      "// Inputs: the 64 pixels of an 8x8 digit image scaled to [0, 1] (value / 16); outputs: 10 logits.",
      f"// Trained with optax Adam (lr 3e-3, batch 64, {epochs} epochs, PRNG key 0) on {num_train} images;",
      f"// test accuracy {test_accuracy:.4f} on {num_test} held-out images (fixed split, numpy seed 0).",
      "// Derived from scikit-learn's bundled digits data (sklearn.datasets.load_digits, BSD-3-Clause),",
      "// originally the UCI 'Optical Recognition of Handwritten Digits' data set (Alpaydin and Kaynak).",
  ]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--num-test-images", type=int, default=20)
  parser.add_argument("--out-dir", type=pathlib.Path, default=DATA_DIR)
  parser.add_argument("--smoke", action="store_true", help="3 epochs, written to a temporary directory")
  args = parser.parse_args(argv)
  if args.smoke:
    args.epochs, args.out_dir = 3, pathlib.Path(tempfile.mkdtemp(prefix="qbound_digits_"))

  x_train, y_train, x_test, y_test = split_digits()
  variables = train(jax.random.key(0), x_train, y_train, epochs=args.epochs)
  train_acc = accuracy(MLP().apply, variables, x_train, y_train)
  test_acc = accuracy(MLP().apply, variables, x_test, y_test)
  print(f"train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} "
        f"({len(x_train)} train / {len(x_test)} test images)")

  n = x_train.shape[1]
  # Clip inputs to the pixel range [0, 1] (the NNet mins/maxes) and do not normalise otherwise:
  # the certified box is then in pixel units and the file's input range is the image domain.
  params = {
      "params": variables["params"],
      "normalisation": {"mins": np.zeros(n, np.float32), "maxes": np.ones(n, np.float32),
                        "means": np.zeros(n, np.float32), "ranges": np.ones(n, np.float32),
                        "output_mean": np.float32(0.0), "output_range": np.float32(1.0)},
  }
  args.out_dir.mkdir(parents=True, exist_ok=True)
  nnet_path = args.out_dir / "digits_mlp.nnet"
  save_nnet(nnet_path, params, header=header_lines(test_acc, len(x_train), len(x_test), args.epochs))
  np.savez_compressed(args.out_dir / "digits_test.npz", images=x_test[: args.num_test_images],
                      labels=y_test[: args.num_test_images])

  # The file must reproduce the trained network: same accuracy through the NNet reader.
  apply, loaded = load_nnet(nnet_path)
  reloaded_acc = accuracy(apply, loaded, x_test, y_test)
  assert abs(reloaded_acc - test_acc) < 1e-9, (reloaded_acc, test_acc)
  print(f"wrote {nnet_path} ({nnet_path.stat().st_size / 1024:.1f} KiB) and "
        f"{args.out_dir / 'digits_test.npz'} ({args.num_test_images} test images)")


if __name__ == "__main__":
  main()
