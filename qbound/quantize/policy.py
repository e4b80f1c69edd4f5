"""Which parameters a transform touches, decided by their path, and composition.

A parameter's path is a tuple such as ``('params', 'Dense_0', 'kernel')``, as in
`flax.traverse_util.flatten_dict`. Paths come from `jax.tree_util` key paths, so
any pytree works: linen variable dicts, nnx `State` (the trailing ``.value`` of
an nnx `Variable` is dropped, so nnx states and their pure dicts give the same
paths), lists, tuples, dataclasses. Dict keys and attribute names stay as they
are, sequence positions become ints.

Only parameters are ever selected: the float leaves a model learns as weights.
In linen variables (a dict with a ``'params'`` key, as ``model.init`` returns)
those are the leaves of the ``'params'`` collection; in an nnx `State` the
values of `nnx.Param` variables. Everything else is state, not weights, and is
never touched, whatever `where` says: batch-norm statistics (linen's
``'batch_stats'`` collection, nnx `BatchStat`), other collections and variable
types, leaves that are not floating-point arrays (integer counters, PRNG keys,
Python scalars). Any other pytree (a plain dict of arrays, ``variables['params']``
alone, ``variables['batch_stats']`` when you do mean to transform statistics)
counts as parameters throughout.

A `where` argument selects among the parameters. It may be

* ``None``: every parameter;
* a predicate ``path -> bool`` such as `kernels_only`;
* a glob pattern over the '/'-joined path, e.g. ``'*/Dense_0/*'``, or a
  sequence of patterns (any may match). A pattern that matches no parameter
  raises ``ValueError`` naming it and listing real paths: a typo such as
  ``'*/kernl'`` would otherwise quantize nothing without a word.

Unselected leaves are returned as they are.

A transform is a pure function ``params -> params`` returning a new pytree of
the same structure; `chain` composes transforms, `masked` restricts one to some
parameters and `by_path` assigns transforms to parameters by path, the way
optax's `chain` and `masked` combine gradient transformations.
"""

from __future__ import annotations

import fnmatch
import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Path = tuple[Union[str, int], ...]
Predicate = Callable[[Path], bool]
Where = Union[None, Predicate, str, Sequence[str]]
Transform = Callable[[PyTree], PyTree]


def path_of(key_path) -> Path:
  """Converts a `jax.tree_util` key path into a plain path tuple.

  >>> import jax
  >>> [(path_of(kp)) for kp, _ in jax.tree_util.tree_leaves_with_path({'a': [1.0, {'b': 2.0}]})]
  [('a', 0), ('a', 1, 'b')]
  """
  out = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(k.key)
    else:
      out.append(str(k))
  # nnx Variables flatten to their `.value`; drop it so paths end in 'kernel'.
  if len(key_path) > 1 and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and out[-1] == 'value':
    out.pop()
  return tuple(out)


def path_str(path: Path) -> str:
  """'/'-joined path, the form used in messages, reports and glob patterns.

  >>> path_str(('params', 'Dense_0', 'kernel'))
  'params/Dense_0/kernel'
  """
  return '/'.join(str(p) for p in path)


def kernels_only(path: Path) -> bool:
  """Selects parameters named 'kernel' (Flax Dense, Conv, nnx Linear weights).

  >>> kernels_only(('params', 'Dense_0', 'kernel')), kernels_only(('params', 'Dense_0', 'bias'))
  (True, False)
  """
  return bool(path) and path[-1] == 'kernel'


def biases_only(path: Path) -> bool:
  """Selects parameters named 'bias'.

  >>> biases_only(('params', 'Dense_0', 'bias'))
  True
  """
  return bool(path) and path[-1] == 'bias'


class PathPattern:
  """A predicate true when the '/'-joined path matches any of its glob patterns.

  It keeps its patterns (``.patterns``) so that a selection can check each one
  matches something.
  """

  def __init__(self, patterns: Sequence[str]):
    for p in patterns:
      if not isinstance(p, str):
        raise ValueError(f'path patterns must be strings, got {p!r}.')
    self.patterns = tuple(patterns)

  def __call__(self, path: Path) -> bool:
    s = path_str(path)
    return any(fnmatch.fnmatchcase(s, p) for p in self.patterns)

  def __repr__(self) -> str:
    return f'path_matches({", ".join(map(repr, self.patterns))})'


def path_matches(*patterns: str) -> Predicate:
  """A predicate true when the '/'-joined path matches any glob pattern.

  `fnmatch` semantics: '*' matches any run of characters, '/' included.

  >>> first = path_matches('*/Dense_0/*', '*/Dense_2/*')
  >>> first(('params', 'Dense_0', 'kernel')), first(('params', 'Dense_1', 'kernel'))
  (True, False)
  """
  return PathPattern(patterns)


def check_patterns_match(predicate: Predicate, paths: Sequence[Path]) -> None:
  """Raises ``ValueError`` if a glob pattern of `predicate` matches none of `paths`.

  Args:
    predicate: a `where` normalised by `as_predicate`; only patterns (not
      functions) are checked.
    paths: the paths of the parameters the patterns select among.

  >>> check_patterns_match(path_matches('*/kernl'), [('params', 'Dense_0', 'kernel')])
  Traceback (most recent call last):
  ...
  ValueError: `where` pattern '*/kernl' matches nothing; the parameters here are 'params/Dense_0/kernel'. ...
  """
  if not isinstance(predicate, PathPattern):
    return
  names = [path_str(p) for p in paths]
  for pattern in predicate.patterns:
    if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
      if not names:
        raise ValueError(f'`where` pattern {pattern!r} matches nothing: there are no float parameters here.')
      shown = ', '.join(repr(n) for n in names[:6]) + (f', ... ({len(names)} in all)' if len(names) > 6 else '')
      raise ValueError(
          f'`where` pattern {pattern!r} matches nothing; the parameters here are {shown}. Patterns match the '
          "whole '/'-joined path ('*' spans '/'), e.g. '*/kernel'."
      )


def as_predicate(where: Where) -> Predicate:
  """Normalizes a `where` argument (None, predicate, pattern or patterns)."""
  if where is None:
    return lambda path: True
  if isinstance(where, str):
    return path_matches(where)
  if callable(where):
    return where
  if isinstance(where, Sequence):
    if not where:
      raise ValueError('`where` is an empty list of patterns, which selects nothing; give patterns, or None '
                       'for every parameter.')
    return path_matches(*where)
  raise ValueError(
      f'`where` must be None, a predicate path -> bool, a glob pattern or a list of '
      f'patterns, got {where!r}.'
  )


def is_float_array(x) -> bool:
  """True for arrays (numpy, JAX, tracers) with a floating-point dtype."""
  dtype = getattr(x, 'dtype', None)
  return dtype is not None and hasattr(x, 'shape') and jnp.issubdtype(dtype, jnp.floating)


def check_finite(path: Path, x) -> None:
  """Raises a `ValueError` naming the parameter if it holds NaN or inf.

  Skipped for traced values inside `jax.jit`, whose contents are unknown. Done
  in numpy so that concrete parameters closed over by a jitted function are
  still checked while it is traced.
  """
  if isinstance(x, jax.core.Tracer):
    return
  a = np.asarray(x)
  if a.dtype.kind != 'f':  # bfloat16 and float8 are numpy extension types
    a = a.astype(np.float32)
  for bad, test in (('NaN', np.isnan), ('inf', np.isinf)):
    if test(a).any():
      raise ValueError(
          f'parameter {path_str(path)!r} contains {bad}; quantizing it would give a '
          f'meaningless grid. Fix the weights, or leave this parameter out with `where=`.'
      )


def leaf_key(key: jax.Array, path: Path) -> jax.Array:
  """A PRNG key for one parameter, derived from its path.

  Keyed by path rather than by position, so a parameter gets the same random
  draws whether or not other parameters are selected alongside it.
  """
  return jax.random.fold_in(key, zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF)


def _nnx_variable_types(tree: PyTree) -> dict[Path, type]:
  """The nnx Variable type (Param, BatchStat, ...) of each leaf path, for trees holding nnx Variables."""
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover - flax is a dependency, nnx part of it
    return {}
  is_variable = lambda x: isinstance(x, nnx.Variable)
  pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]
  return {path_of(kp): type(v) for kp, v in pairs if is_variable(v)}


def parameter_mask(tree: PyTree, paths: Sequence[Path]) -> list[bool]:
  """Per leaf (given by its path), whether it is a parameter rather than model state.

  Linen variables (a mapping with a ``'params'`` key): leaves of that collection.
  nnx states: values of `nnx.Param` variables. Other trees: every leaf.

  >>> parameter_mask({'params': {'w': 1.0}, 'batch_stats': {'mean': 0.0}},
  ...                [('params', 'w'), ('batch_stats', 'mean')])
  [True, False]
  """
  if isinstance(tree, Mapping) and 'params' in tree:
    return [bool(p) and p[0] == 'params' for p in paths]
  types = _nnx_variable_types(tree)
  if not types:
    return [True] * len(paths)
  from flax import nnx

  return [p not in types or issubclass(types[p], nnx.Param) for p in paths]


class Selection:
  """A flattened pytree with the positions of the selected float parameters.

  Used by transforms that need several parameters at once (global pruning).
  Only parameters are ever selected (see `parameter_mask`); a glob pattern in
  `where` that matches none of them raises ``ValueError``.
  """

  def __init__(self, params: PyTree, where: Where = None, *, check: bool = True):
    pairs, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.paths: list[Path] = [path_of(kp) for kp, _ in pairs]
    self.leaves: list[Any] = [x for _, x in pairs]
    predicate = as_predicate(where)
    candidates = [
        i for i, (p, x, keep) in enumerate(zip(self.paths, self.leaves, parameter_mask(params, self.paths)))
        if keep and is_float_array(x)
    ]
    if not candidates:
      raise ValueError(_no_parameters(params))
    check_patterns_match(predicate, [self.paths[i] for i in candidates])
    self.indices: list[int] = [i for i in candidates if predicate(self.paths[i])]
    if check:
      for i in self.indices:
        check_finite(self.paths[i], self.leaves[i])

  @property
  def selected(self) -> list[tuple[Path, Any]]:
    """(path, leaf) of each selected leaf, in tree order."""
    return [(self.paths[i], self.leaves[i]) for i in self.indices]

  def rebuild(self, new_values: Sequence[Any]) -> PyTree:
    """The original tree with the selected leaves replaced, in order."""
    leaves = list(self.leaves)
    for i, v in zip(self.indices, new_values, strict=True):
      leaves[i] = v
    return self.treedef.unflatten(leaves)


def _no_parameters(params: PyTree) -> str:
  """What to say when a transform is given a tree without one float array to change."""
  what = type(params).__name__
  hint = ''
  if isinstance(params, (list, tuple, dict)) and any(isinstance(x, float) for x in jax.tree_util.tree_leaves(params)):
    hint = ' Its numbers are Python floats: make each leaf an array first (jax.tree.map(jnp.asarray, params)).'
  return (f'no float parameters to transform in the {what} given: pass the parameters pytree (the '
          'variables from model.init, or nnx.state(model, nnx.Param)), whose weights are float arrays; '
          f'the transform would otherwise return it unchanged.{hint}')


def map_selected(fn: Callable[[Path, jax.Array], jax.Array], params: PyTree, where: Where = None) -> PyTree:
  """Applies ``fn(path, leaf)`` to each selected float leaf; others pass through.

  Every selected leaf is first checked for NaN and inf.

  >>> map_selected(lambda path, x: 2 * x, {'kernel': jnp.ones(2), 'bias': jnp.ones(1)}, kernels_only)
  {'bias': Array([1.], dtype=float32), 'kernel': Array([2., 2.], dtype=float32)}
  """
  sel = Selection(params, where)
  return sel.rebuild([fn(p, x) for p, x in sel.selected])


def chain(*transforms: Transform) -> Transform:
  """Composes transforms left to right: ``chain(f, g)(p) == g(f(p))``.

  >>> double = lambda p: jax.tree_util.tree_map(lambda x: 2 * x, p)
  >>> chain(double, double)({'w': jnp.ones(2)})['w'].tolist()
  [4.0, 4.0]
  """
  for t in transforms:
    if not callable(t):
      raise ValueError(f'chain expects callables params -> params, got {t!r}.')

  def chained(params: PyTree) -> PyTree:
    return functools.reduce(lambda p, t: t(p), transforms, params)

  return chained


class _Hidden:
  """A pytree node with no children, standing in for a leaf a transform must not see."""


jax.tree_util.register_pytree_node(_Hidden, lambda _: ((), None), lambda _, __: _Hidden())


def _apply_to(transform: Transform, params: PyTree, chosen: set[int]) -> PyTree:
  """Runs `transform` on a copy of `params` holding only the leaves in `chosen`."""
  if not chosen:
    return params
  leaves, treedef = jax.tree_util.tree_flatten(params)
  visible = treedef.unflatten([x if i in chosen else _Hidden() for i, x in enumerate(leaves)])
  result = transform(visible)
  # Flattening with _Hidden as a leaf realigns the result with the original leaves.
  new = jax.tree_util.tree_leaves(result, is_leaf=lambda x: isinstance(x, _Hidden))
  if len(new) != len(leaves):
    raise ValueError('the transform changed the tree structure; transforms must keep it.')
  return treedef.unflatten([leaves[i] if i not in chosen else v for i, v in enumerate(new)])


def masked(transform: Transform, where: Where) -> Transform:
  """Restricts `transform` to the selected parameters.

  The inner transform sees a tree whose unselected leaves are hidden (empty
  subtrees), so a transform that looks at several parameters at once, like
  global pruning, only sees the selected ones. Non-float leaves are hidden too.

  >>> from qbound.quantize.weights import uniform_quantizer
  >>> p = {'kernel': jnp.array([0.3, 1.0]), 'bias': jnp.array([0.3])}
  >>> q = masked(uniform_quantizer(bits=2), kernels_only)(p)
  >>> q['kernel'].tolist(), q['bias'].tolist()
  ([0.0, 1.0], [0.30000001192092896])
  """
  predicate = as_predicate(where)

  def apply(params: PyTree) -> PyTree:
    # No finiteness check here: the inner transform checks what it changes.
    sel = Selection(params, predicate, check=False)
    return _apply_to(transform, params, set(sel.indices))

  return apply


def by_path(rules: Sequence[tuple[Where, Transform | None]] | Mapping[Any, Transform | None]) -> Transform:
  """A policy: each parameter gets the transform of the first rule it matches.

  Args:
    rules: ``(where, transform)`` pairs, in priority order (a dict works too).
      `where` is a glob pattern, a list of patterns or a predicate; a `None`
      transform keeps the matched parameters as they are. Parameters that match
      no rule are returned unchanged.

  Returns:
    A transform ``params -> params``.

  First and last layer at 8 bits, the rest at 4, kernels only:

  >>> import flax.linen as nn
  >>> from qbound.quantize.weights import uniform_quantizer
  >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu, nn.Dense(1)])
  >>> params = mlp.init(jax.random.key(0), jnp.ones(3))
  >>> policy = by_path([
  ...     (['*/layers_0/kernel', '*/layers_4/kernel'], uniform_quantizer(bits=8)),
  ...     ('*/kernel', uniform_quantizer(bits=4)),
  ... ])
  >>> qparams = policy(params)
  >>> len(set(qparams['params']['layers_2']['kernel'].ravel().tolist())) <= 15
  True
  """
  items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  compiled = []
  for rule in items:
    if not (isinstance(rule, tuple) and len(rule) == 2):
      raise ValueError(f'each rule must be a (where, transform) pair, got {rule!r}.')
    where, transform = rule
    if transform is not None and not callable(transform):
      raise ValueError(f'rule transform must be callable or None, got {transform!r}.')
    compiled.append((as_predicate(where), transform))

  def apply(params: PyTree) -> PyTree:
    sel = Selection(params, check=False)
    for predicate, _ in compiled:
      check_patterns_match(predicate, [sel.paths[i] for i in sel.indices])
    groups: list[set[int]] = [set() for _ in compiled]
    for i in sel.indices:
      for g, (predicate, _) in enumerate(compiled):
        if predicate(sel.paths[i]):
          groups[g].add(i)
          break
    for (_, transform), chosen in zip(compiled, groups):
      if transform is not None:
        params = _apply_to(transform, params, chosen)
    return params

  return apply
