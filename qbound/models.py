"""A small zoo of Flax linen models for tests, examples and experiments.

Every model takes ONE unbatched input, as qbound's functions do (a vector for :class:`MLP`, an
``(H, W, C)`` image for the convolutional ones), and also accepts a batch (a leading axis).
Everything in them is something qbound bounds exactly: dense and convolution layers, ReLU,
leaky ReLU, tanh, sigmoid, hard tanh, max and average pooling, residual additions.

Example:
  >>> import functools, jax, jax.numpy as jnp, qbound as qb
  >>> model = qb.models.CNN(channels=(2,), features=(8,), outputs=3, activation="tanh")
  >>> params = model.init(jax.random.key(0), jnp.zeros((6, 6, 1)))
  >>> f = functools.partial(model.apply, params)
  >>> f(jnp.zeros((6, 6, 1))).shape
  (3,)
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import flax.linen as nn

ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "tanh": nn.tanh,
    "sigmoid": nn.sigmoid,
    "hard_tanh": nn.hard_tanh,
    "relu6": nn.relu6,
}

Activation = Union[str, Callable]


def activation_fn(activation: Activation) -> Callable:
  """An activation by name (``relu``, ``leaky_relu``, ``tanh``, ``sigmoid``, ``hard_tanh``, ``relu6``)
  or the function itself."""
  if callable(activation):
    return activation
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)} or pass a function.")
  return ACTIVATIONS[activation]


def _pool(x, pool: str, size: int):
  if pool == "max":
    return nn.max_pool(x, (size, size), strides=(size, size))
  if pool == "avg":
    return nn.avg_pool(x, (size, size), strides=(size, size))
  if pool == "none":
    return x
  raise ValueError(f"unknown pooling {pool!r}; choose 'max', 'avg' or 'none'.")


def _batched(x, image: bool):
  """``(x with a batch axis, whether one was added)``."""
  single = x.ndim == (3 if image else 1)
  return (x[None] if single else x), single


class MLP(nn.Module):
  """Dense layers with an activation between them (none after the last).

  Attributes:
    features: the width of every layer, the last being the number of outputs.
    activation: a name from :data:`ACTIVATIONS` or a function.

  Example:
    >>> import jax, jax.numpy as jnp, qbound as qb
    >>> model = qb.models.MLP(features=(16, 16, 3), activation="sigmoid")
    >>> params = model.init(jax.random.key(0), jnp.zeros(5))
    >>> model.apply(params, jnp.ones(5)).shape
    (3,)
  """

  features: Sequence[int] = (32, 32, 10)
  activation: Activation = "relu"

  @nn.compact
  def __call__(self, x):
    act = activation_fn(self.activation)
    for i, width in enumerate(self.features):
      x = nn.Dense(width)(x)
      if i < len(self.features) - 1:
        x = act(x)
    return x


class CNN(nn.Module):
  """Convolutions (each followed by the activation and a pooling), then dense layers.

  Attributes:
    channels: output channels of each ``kernel_size`` convolution (padding ``SAME``).
    features: widths of the hidden dense layers after flattening.
    outputs: number of outputs.
    activation: a name from :data:`ACTIVATIONS` or a function.
    pool: ``"max"``, ``"avg"`` or ``"none"`` after every convolution, window and stride ``pool_size``.
    kernel_size: the convolutions' window.
    pool_size: the pooling window and stride.

  Example:
    >>> import jax, jax.numpy as jnp, qbound as qb
    >>> model = qb.models.CNN(channels=(4, 8), features=(16,), outputs=10, pool="avg")
    >>> params = model.init(jax.random.key(0), jnp.zeros((8, 8, 1)))
    >>> model.apply(params, jnp.zeros((8, 8, 1))).shape, model.apply(params, jnp.zeros((2, 8, 8, 1))).shape
    ((10,), (2, 10))
  """

  channels: Sequence[int] = (4, 8)
  features: Sequence[int] = (32,)
  outputs: int = 10
  activation: Activation = "relu"
  pool: str = "max"
  kernel_size: tuple[int, int] = (3, 3)
  pool_size: int = 2

  @nn.compact
  def __call__(self, x):
    act = activation_fn(self.activation)
    x, single = _batched(x, image=True)
    for c in self.channels:
      x = _pool(act(nn.Conv(c, self.kernel_size)(x)), self.pool, self.pool_size)
    x = x.reshape(x.shape[0], -1)
    for width in self.features:
      x = act(nn.Dense(width)(x))
    x = nn.Dense(self.outputs)(x)
    return x[0] if single else x


class ResidualBlock(nn.Module):
  """``act(x + conv(act(conv(x))))``: two ``SAME`` convolutions and a residual addition."""

  channels: int
  activation: Activation = "relu"
  kernel_size: tuple[int, int] = (3, 3)

  @nn.compact
  def __call__(self, x):
    act = activation_fn(self.activation)
    h = act(nn.Conv(self.channels, self.kernel_size)(x))
    h = nn.Conv(self.channels, self.kernel_size)(h)
    return act(x + h)


class ResidualCNN(nn.Module):
  """A stem convolution, residual blocks (each followed by a pooling), then a dense layer.

  Attributes:
    channels: channels of the stem and of every block.
    blocks: number of :class:`ResidualBlock` s.
    outputs: number of outputs.
    activation: a name from :data:`ACTIVATIONS` or a function.
    pool: ``"max"``, ``"avg"`` or ``"none"`` after every block (window and stride 2).

  Example:
    >>> import functools, jax, jax.numpy as jnp, qbound as qb
    >>> model = qb.models.ResidualCNN(channels=2, blocks=1, outputs=2, activation="tanh")
    >>> params = model.init(jax.random.key(0), jnp.zeros((4, 4, 1)))
    >>> f = functools.partial(model.apply, params)
    >>> box = qb.linf_ball(jnp.zeros((4, 4, 1)), 0.1)
    >>> out = qb.bounds.interval(f, box)
    >>> bool(jnp.all(out.lower <= f(box.center)) and jnp.all(f(box.center) <= out.upper))
    True
  """

  channels: int = 4
  blocks: int = 2
  outputs: int = 10
  activation: Activation = "relu"
  pool: str = "max"

  @nn.compact
  def __call__(self, x):
    act = activation_fn(self.activation)
    x, single = _batched(x, image=True)
    x = act(nn.Conv(self.channels, (3, 3))(x))
    for _ in range(self.blocks):
      x = _pool(ResidualBlock(self.channels, self.activation)(x), self.pool, 2)
    x = nn.Dense(self.outputs)(x.reshape(x.shape[0], -1))
    return x[0] if single else x


__all__ = ["ACTIVATIONS", "CNN", "MLP", "ResidualBlock", "ResidualCNN", "activation_fn"]
