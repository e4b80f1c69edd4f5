"""The check of :func:`qbound.bounds.branch_and_bound`'s arguments (also
:func:`qbound.bounds.forward_bab.forward_branch_and_bound`'s): every argument refused before anything
is traced or compiled, worded as :mod:`qbound.validate` words its checks.

Example:
  >>> import jax.numpy as jnp, qbound as qb
  >>> from qbound.bounds.arguments import branch_and_bound_args
  >>> merged = qb.merge(lambda x: 2 * x, lambda x: 2 * x, jnp.zeros(2))
  >>> branch_and_bound_args(merged, qb.Box(-jnp.ones(2), jnp.ones(2))).shape
  (2,)
  >>> branch_and_bound_args(merged, qb.Box(-jnp.ones(2), jnp.ones(2)), time_budget=-1)
  Traceback (most recent call last):
  ...
  ValueError: time_budget must be a number of seconds >= 0 (math.inf for no limit); got -1.
"""

from __future__ import annotations

import numpy as np

from qbound import validate
from qbound.box import validate_box
from qbound.merge import MergedNetwork


def branch_and_bound_args(merged, box, *, outputs=None, time_budget=10.0, target_gap=0.05, epsilon=None,
                          batch_size=None, max_pieces=1_000_000, initial_lower=0.0, initial_witness=None,
                          sound=True, strong_branching_dims=8, mesh=None, progress=False):
  """Checks every argument of :func:`qbound.bounds.branch_and_bound`; returns the box, validated.

  Meant as the first line of ``branch_and_bound`` (``box = branch_and_bound_args(merged, box,
  outputs=outputs, ...)``), with the same defaults, so that it refuses what it cannot use before
  compiling anything.
  """
  if not isinstance(merged, MergedNetwork):
    raise TypeError(f"merged must be a qbound.MergedNetwork, from qbound.merge(f, fq, box); got "
                    f"{type(merged).__name__}.")
  box = validate_box(box)
  if tuple(box.shape) != tuple(merged.input_shape):
    raise ValueError(f"box has shape {box.shape} but the network's input has shape {tuple(merged.input_shape)}.")
  validate.output_indices("outputs", outputs, int(np.prod(merged.output_shape)))
  # 0 is allowed here (bound the root piece only); the public entry points ask for > 0.
  validate.number("time_budget", time_budget, minimum=0.0, allow_inf=True,
                  accepted="a number of seconds >= 0 (math.inf for no limit)")
  validate.optional_boolean("progress", progress)
  validate.non_negative("target_gap", target_gap)
  validate.optional_non_negative("epsilon", epsilon)
  if batch_size is not None:
    validate.integer("batch_size", batch_size, minimum=1, accepted="None or an integer >= 1")
  validate.integer("max_pieces", max_pieces, minimum=1)
  validate.non_negative("initial_lower", initial_lower)
  if initial_witness is not None:
    witness = np.asarray(initial_witness)
    if witness.shape != tuple(box.shape) or not np.issubdtype(witness.dtype, np.number):
      raise ValueError(f"initial_witness must be None or an input of the box's shape {box.shape}; got an array of "
                       f"shape {witness.shape} and dtype {witness.dtype}.")
  validate.boolean("sound", sound)
  validate.integer("strong_branching_dims", strong_branching_dims, minimum=0)
  validate.mesh_or_devices(mesh, None)
  return box
