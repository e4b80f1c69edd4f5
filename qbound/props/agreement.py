"""Certified top-1 agreement over a set of boxes: the share of inputs whose class provably cannot change.

Accuracy-style agreement (``argmax f(x) = argmax f_q(x)`` on test points) says how often the
compressed model agrees where it was measured; the certified agreement says on how many L-inf
balls around those points it agrees *everywhere*, proven by :func:`qbound.props.verify`, and how
many balls hold a counterexample. The two side by side show how much of the measured agreement
survives small perturbations.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qbound import validate
from qbound.box import Box, box_at, validate_boxes
from qbound.props.spec import Top1
from qbound.props.verify import Verdict, verify


@dataclasses.dataclass(frozen=True)
class Agreement:
  """Certified and measured agreement of two networks over a set of boxes.

  Attributes:
    verdicts: one :class:`~qbound.props.Verdict` per box.
    measured: per box, whether the two networks pick the same class at its point (the box's centre
      unless ``points`` were given).
    seconds: wall-clock time of the whole run.
  """

  verdicts: tuple[Verdict, ...]
  measured: np.ndarray
  seconds: float

  @property
  def certified(self) -> float:
    """Share of boxes where the property is proved."""
    return float(np.mean([v.status == "proved" for v in self.verdicts]))

  @property
  def refuted(self) -> float:
    """Share of boxes with a counterexample."""
    return float(np.mean([v.status == "counterexample" for v in self.verdicts]))

  @property
  def unknown(self) -> float:
    """Share of boxes left undecided."""
    return float(np.mean([v.status == "unknown" for v in self.verdicts]))

  @property
  def measured_agreement(self) -> float:
    """Share of boxes whose points (centres by default) the two networks classify alike."""
    return float(np.mean(self.measured))

  def row(self) -> dict:
    """One row of a results table."""
    return {"boxes": len(self.verdicts), "measured": self.measured_agreement, "certified": self.certified,
            "counterexample": self.refuted, "unknown": self.unknown, "seconds": self.seconds}

  def __str__(self) -> str:
    r = self.row()
    return (f"{r['boxes']} boxes: agreement at the points {r['measured']:.1%}, certified {r['certified']:.1%}, "
            f"counterexample {r['counterexample']:.1%}, unknown {r['unknown']:.1%} ({r['seconds']:.1f} s)")


def certified_agreement(f: Callable, fq: Callable, boxes: Box, *, prop=None, time_budget: float = 2.0, key=None,
                        sound: bool = True, points=None, warm_up: bool = True,
                        progress: Optional[bool] = None) -> Agreement:
  """Decides ``prop`` (top-1 equivalence by default) on each box of a batch of boxes.

  Args:
    f, fq: the two networks (logits), pure JAX functions of one unbatched input.
    boxes: boxes along a leading axis (e.g. ``qb.linf_ball(x_test, 0.02)`` for a test set ``x_test``).
    prop: a class property (``Top1()`` or ``DeltaTop1(delta)``).
    time_budget: seconds per box.
    key: a ``jax.random`` key, split over the boxes.
    sound: proven floating-point margins.
    points: where the measured agreement is taken, one point per box (e.g. the test images, when
      the balls around them are clipped to the input range and so are not centred on them);
      default: the boxes' centres.
    warm_up: first bound the first box once, untimed, so that compiling does not eat the first
      boxes' budgets (one root bound and one search, a fraction of a second once compiled).
    progress: a progress bar over the boxes (``None``: only on a terminal).

  Returns:
    An :class:`Agreement`.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(2))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=8))
    >>> boxes = qb.linf_ball(jax.random.uniform(jax.random.key(1), (4, 2)), 0.01)
    >>> report = qb.props.certified_agreement(f, fq, boxes, time_budget=5.0)
    >>> 0.0 <= report.certified <= 1.0
    True
  """
  start = time.perf_counter()
  prop = Top1() if prop is None else prop
  key = validate.prng_key("key", key)
  key = jax.random.key(0) if key is None else key
  time_budget = validate.seconds("time_budget", time_budget)
  boxes = validate_boxes(boxes)
  n = boxes.lower.shape[0]
  warm_up = validate.boolean("warm_up", warm_up)
  if points is None:
    points = (jnp.asarray(boxes.lower) + jnp.asarray(boxes.upper)) / 2
  points = jnp.asarray(points, boxes.lower.dtype)
  if points.shape != boxes.lower.shape:
    raise ValueError(f"points must hold one point per box, of shape {tuple(boxes.lower.shape)}; got {points.shape}.")
  same = np.asarray(jnp.argmax(jax.vmap(lambda x: f(x).reshape(-1))(points), axis=-1)
                    == jnp.argmax(jax.vmap(lambda x: fq(x).reshape(-1))(points), axis=-1))
  if warm_up:
    verify(f, fq, box_at(boxes, 0), prop, time_budget=1e-9, key=key, sound=sound, progress=False)
  verdicts = []
  for i, k in enumerate(tqdm(jax.random.split(key, n), desc="boxes", disable=None if progress is None else not progress,
                             leave=False)):
    verdicts.append(verify(f, fq, box_at(boxes, i), prop, time_budget=time_budget, key=k, sound=sound,
                           progress=False))
  return Agreement(verdicts=tuple(verdicts), measured=same, seconds=time.perf_counter() - start)
