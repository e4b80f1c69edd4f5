"""Data-parallel layout over devices: batches of boxes or pieces split, the network replicated.

qbound's batched work (many boxes in :func:`qbound.certify_batch`, the frontier of
:func:`qbound.bounds.branch_and_bound`, the samples of :func:`qbound.maximize_error`) is
embarrassingly parallel: every box, piece or sample is handled on its own, with the network's
weights read by all. This module lays it out with JAX's own SPMD machinery, nothing else:

* a one-axis :class:`jax.sharding.Mesh` over the devices (default: all of ``jax.devices()``,
  which after ``jax.distributed.initialize()`` are the devices of every host);
* batched inputs as global arrays with ``NamedSharding(mesh, PartitionSpec(AXIS))`` (split along
  their leading axis, padded to a multiple of the device count), the graph's weights with
  ``NamedSharding(mesh, PartitionSpec())`` (replicated);
* the per-device program written with :func:`jax.shard_map` over the local slice, so every device
  runs exactly the single-device program on fewer boxes and no device talks to another.

The same call runs unchanged on one CPU, on ``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
on GPUs and TPUs, and on several hosts (see ``examples/multi_host.py``).

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from qbound import sharding
  >>> mesh = sharding.default_mesh()
  >>> x = sharding.put_batch(np.zeros((sharding.padded_size(3, mesh), 2), np.float32), mesh)
  >>> sum(rows for rows in sharding.layout(x).values()) == x.shape[0]
  True
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"  # the mesh axis along which boxes, pieces and samples are split


def default_mesh(devices: Optional[Sequence] = None) -> Mesh:
  """A one-axis mesh (axis name :data:`AXIS`) over ``devices`` (default: ``jax.devices()``)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices is empty; give at least one jax device (e.g. jax.devices()[:1]).")
  return Mesh(np.asarray(devices, dtype=object), (AXIS,))


def resolve_mesh(mesh: Optional[Mesh] = None, devices: Optional[Sequence] = None) -> Mesh:
  """``mesh`` if given (it must have an axis named :data:`AXIS`), else a mesh over ``devices``."""
  if mesh is not None and devices is not None:
    raise ValueError("give either mesh or devices, not both.")
  if mesh is None:
    return default_mesh(devices)
  if AXIS not in mesh.axis_names or len(mesh.axis_names) != 1:
    raise ValueError(f"the mesh must have exactly one axis, named {AXIS!r} (qbound.sharding.AXIS), got axes "
                     f"{mesh.axis_names}; build it with qbound.sharding.default_mesh(devices).")
  if any(kind != jax.sharding.AxisType.Auto for kind in getattr(mesh, "axis_types", ())):
    # jax.make_mesh's axes are Explicit: arrays then carry their sharding in their types, and the
    # bound steps, mapped over boxes beside arrays built on one device, were refused deep inside JAX
    # ("inputs passed to vmap should be sharded the same"). qbound places its arrays itself.
    mesh = Mesh(mesh.devices, mesh.axis_names)
  return mesh


def size(mesh: Optional[Mesh]) -> int:
  """The number of devices the batch is split over (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.devices.size)


def padded_size(n: int, mesh: Optional[Mesh]) -> int:
  """``n`` rounded up to a multiple of the mesh's device count."""
  k = size(mesh)
  return -(-int(n) // k) * k


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """``x`` with its last row repeated until it has ``rows`` rows (the padding is thrown away later)."""
  x = np.asarray(x)
  if x.shape[0] == rows:
    return x
  if x.shape[0] > rows or x.shape[0] == 0:
    raise ValueError(f"cannot pad {x.shape[0]} rows to {rows}.")
  return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split along the leading axis over the mesh."""
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def _global(x, sharding: NamedSharding):
  x = np.asarray(x)
  x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)  # int64 -> int32 without jax_enable_x64
  # make_array_from_callback works with one process and with many (each host fills the shards of
  # its own devices from the same host array), where device_put of a host array may not.
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_batch(tree, mesh: Mesh):
  """Host arrays (leading axis a multiple of the device count) as global arrays split over the mesh."""
  return jax.tree_util.tree_map(lambda x: _global(x, batch_sharding(mesh)), tree)


def put_replicated(tree, mesh: Mesh):
  """Every array leaf of ``tree`` copied to every device of the mesh (non-array leaves kept)."""
  return jax.tree_util.tree_map(lambda x: _global(x, replicated(mesh)) if _is_array(x) else x, tree)


def put_plain(tree):
  """Every array leaf of ``tree`` as a JAX array on the default device, committed to none (non-array
  leaves kept): what ``jax.jit`` and compiled programs return for such arguments, so that functions
  fed both see one kind of array (jit compiles once per mix of its arguments' shardings).

  Example:
    >>> import numpy as np
    >>> from qbound import sharding
    >>> x, label = sharding.put_plain((np.zeros(3, np.float32), "kept"))
    >>> x.committed, label
    (False, 'kept')
  """
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x) if _is_array(x) else x, tree)


def _is_array(x) -> bool:
  return isinstance(x, (np.ndarray, jax.Array, np.generic))


def gather(tree):
  """Global arrays back on the host as numpy arrays (all hosts get everything)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
  return jax.tree_util.tree_map(np.asarray, tree)


def data_parallel(body: Callable, mesh: Optional[Mesh], replicated_args: int, batched_args: int) -> Callable:
  """``body`` run on every device over its slice of the batch (``jax.shard_map``), or as is without a mesh.

  The first ``replicated_args`` arguments are the same on every device (the network); the next
  ``batched_args`` are split along their leading axis; every output is split the same way. Call
  it inside ``jax.jit``. No collectives: a device never waits for another.
  """
  if mesh is None:
    return body
  specs = (PartitionSpec(),) * replicated_args + (PartitionSpec(AXIS),) * batched_args
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(AXIS), check_vma=False)


def constrain_batch(x, mesh: Optional[Mesh]):
  """Inside ``jax.jit``: ask for ``x`` split along its leading axis over the mesh (any length)."""
  if mesh is None or size(mesh) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


def device_index(mesh: Optional[Mesh], rows: int):
  """Inside a :func:`data_parallel` body: the mesh position of this device, once per local row."""
  if mesh is None:
    return jnp.zeros(rows, jnp.int32)
  return jnp.full(rows, jax.lax.axis_index(AXIS), jnp.int32)


def layout(x: jax.Array) -> dict[int, int]:
  """``{device id: rows of x's leading axis held there}`` for a (global) array: where the data is."""
  out: dict[int, int] = {}
  for shard in x.addressable_shards:
    rows = shard.data.shape[0] if shard.data.ndim else 1
    out[int(shard.device.id)] = out.get(int(shard.device.id), 0) + int(rows)
  return out
