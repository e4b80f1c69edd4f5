"""Storage size of compressed parameters: codebooks, sparse positions and Huffman codes.

Stage three of Deep Compression (Han, Mao & Dally, ICLR 2016) stores each
layer as a codebook of shared values plus, per weight, an index into it; for a
pruned layer only the nonzero weights are stored, each with the gap to the
previous one in a few bits (a "filler" zero is inserted when a gap does not
fit); the indices and gaps are then Huffman coded (Huffman 1952, "A Method for
the Construction of Minimum-Redundancy Codes"). `size_report` measures that
storage for parameters as they are, e.g. after ``prune -> share_weights`` or a
uniform quantizer: the codebook of a parameter is the set of its distinct
nonzero values. It is plain Python and numpy, not jit-able.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping

import numpy as np

from qbound.quantize.policy import PyTree, Selection, Where, kernels_only, path_str

FLOAT32_BITS = 32


def huffman_code_lengths(counts: Mapping[Hashable, int]) -> dict[Hashable, int]:
  """Code length in bits of each symbol in a Huffman code for the given counts.

  Repeatedly merges the two least frequent subtrees (ties broken by first
  appearance, so the result is deterministic); a symbol's length is its depth.
  A lone symbol gets 1 bit, so every stored symbol costs at least one bit.

  Args:
    counts: symbol -> number of occurrences (positive ints).

  Returns:
    symbol -> code length.

  >>> huffman_code_lengths({'a': 45, 'b': 13, 'c': 12, 'd': 16, 'e': 9, 'f': 5})
  {'a': 1, 'b': 3, 'c': 3, 'd': 3, 'e': 4, 'f': 4}
  """
  symbols = list(counts)
  for s in symbols:
    c = counts[s]
    if isinstance(c, bool) or int(c) != c or c <= 0:
      raise ValueError(f'Huffman counts must be positive integers, got {c!r} for {s!r}.')
  if len(symbols) <= 1:
    return {s: 1 for s in symbols}
  # Nodes 0..n-1 are the symbols, merged nodes get the next ids; a parent's id is
  # always larger than its children's, so depths fill in one backward pass.
  heap = [(int(counts[s]), i) for i, s in enumerate(symbols)]
  heapq.heapify(heap)
  parent = [-1] * (2 * len(symbols) - 1)
  next_id = len(symbols)
  while len(heap) > 1:
    c1, a = heapq.heappop(heap)
    c2, b = heapq.heappop(heap)
    parent[a] = parent[b] = next_id
    heapq.heappush(heap, (c1 + c2, next_id))
    next_id += 1
  depth = [0] * len(parent)
  for node in range(len(parent) - 2, -1, -1):
    depth[node] = depth[parent[node]] + 1
  return {s: depth[i] for i, s in enumerate(symbols)}


def huffman_bits(symbols: Iterable[Hashable]) -> int:
  """Total bits of a symbol stream under its own Huffman code (the code table not counted).

  >>> huffman_bits('aaaabbc')
  10
  """
  counts = Counter(symbols)
  lengths = huffman_code_lengths(counts)
  return sum(counts[s] * lengths[s] for s in counts)


def _fixed_bits(num_symbols: int) -> int:
  return max(1, math.ceil(math.log2(num_symbols))) if num_symbols > 1 else 1


def _stream_bits(stream: np.ndarray, huffman: bool) -> int:
  if stream.size == 0:
    return 0
  values, counts = np.unique(stream, return_counts=True)
  if not huffman:
    return int(stream.size) * _fixed_bits(values.size)
  lengths = huffman_code_lengths(dict(zip(values.tolist(), counts.tolist())))
  return int(sum(int(c) * lengths[v] for v, c in zip(values.tolist(), counts.tolist())))


@dataclasses.dataclass(frozen=True)
class LayerSize:
  """Storage of one compressed parameter.

  Attributes:
    path: '/'-joined parameter path.
    num_params: number of weights.
    num_nonzero: number of nonzero weights.
    codebook_size: distinct nonzero values, each stored as a float32.
    sparse: stored as nonzero entries with relative positions (else dense).
    index_bits: bits of the codebook indices (fillers included when sparse).
    position_bits: bits of the relative positions (0 when dense).
    codebook_bits: 32 * codebook_size (0 when raw).
    raw: values stored as plain float32 (no codebook, no indices): chosen when cheaper, e.g. for
      weights that were never shared or quantized, so a report never shows a ratio below 1.
  """

  path: str
  num_params: int
  num_nonzero: int
  codebook_size: int
  sparse: bool
  index_bits: int
  position_bits: int
  codebook_bits: int
  raw: bool = False

  @property
  def total_bits(self) -> int:
    return self.index_bits + self.position_bits + self.codebook_bits


@dataclasses.dataclass(frozen=True)
class SizeReport:
  """Storage of a parameter pytree against float32.

  Attributes:
    layers: one `LayerSize` per compressed parameter.
    num_params: all float weights, compressed or not.
    uncompressed_params: float weights outside `where`, counted at 32 bits.
    original_bytes: 4 * num_params.
    compressed_bytes: total bits / 8 (a fraction when bits do not fill bytes).
  """

  layers: tuple[LayerSize, ...]
  num_params: int
  uncompressed_params: int

  @property
  def total_bits(self) -> int:
    return sum(l.total_bits for l in self.layers) + FLOAT32_BITS * self.uncompressed_params

  @property
  def original_bytes(self) -> int:
    return FLOAT32_BITS // 8 * self.num_params

  @property
  def compressed_bytes(self) -> float:
    return self.total_bits / 8

  @property
  def bits_per_weight(self) -> float:
    return self.total_bits / self.num_params if self.num_params else 0.0

  @property
  def compression_ratio(self) -> float:
    """original_bytes / compressed_bytes (inf for an empty tree)."""
    return self.original_bytes / self.compressed_bytes if self.total_bits else math.inf


def _layer_size(path: str, x: np.ndarray, huffman: bool, position_bits: int) -> LayerSize:
  flat = x.ravel()
  nonzero = np.flatnonzero(flat)
  values = flat[nonzero]
  codebook = np.unique(values)
  codebook_bits = FLOAT32_BITS * codebook.size

  # Dense: one index per weight; zero is an extra symbol but needs no codebook entry.
  dense_index_bits = _stream_bits(flat, huffman)

  # Sparse (Deep Compression Fig. 2): gaps d >= 1 between nonzero positions,
  # each stored in `position_bits` bits as d - 1 in [0, span); a larger gap is
  # bridged by filler entries that advance by span and hold the zero symbol.
  span = 2**position_bits
  gaps = np.diff(nonzero, prepend=-1)
  fillers = (gaps - 1) // span
  zero = np.zeros((), flat.dtype)
  index_stream = np.concatenate([np.repeat(zero, int(fillers.sum())), values])
  gap_stream = np.concatenate([np.full(int(fillers.sum()), span), gaps - fillers * span])
  sparse_index_bits = _stream_bits(index_stream, huffman)
  sparse_position_bits = (
      _stream_bits(gap_stream, True) if huffman else position_bits * gap_stream.size
  )

  has_zeros = nonzero.size < flat.size
  # (sparse, raw) -> (value or index bits, position bits, codebook bits); the cheapest is stored.
  candidates = {
      (False, False): (dense_index_bits, 0, codebook_bits),
      (False, True): (FLOAT32_BITS * flat.size, 0, 0),
  }
  if has_zeros:
    candidates[(True, False)] = (sparse_index_bits, sparse_position_bits, codebook_bits)
    candidates[(True, True)] = (FLOAT32_BITS * index_stream.size, sparse_position_bits, 0)
  (sparse, raw), (index_bits, positions, codebook_bits) = min(candidates.items(), key=lambda kv: sum(kv[1]))
  return LayerSize(
      path=path,
      num_params=int(flat.size),
      num_nonzero=int(nonzero.size),
      codebook_size=0 if raw else int(codebook.size),
      sparse=bool(sparse),
      index_bits=int(index_bits),
      position_bits=int(positions),
      codebook_bits=int(codebook_bits),
      raw=bool(raw),
  )


def size_report(
    params: PyTree, *, where: Where = kernels_only, huffman: bool = True, position_bits: int = 5
) -> SizeReport:
  """Storage of compressed parameters, Deep Compression style, against float32.

  For each selected parameter: a float32 codebook of its distinct nonzero
  values, plus either a dense stream of one index per weight, or (if smaller,
  and the parameter has zeros) a sparse stream of the nonzero weights' indices
  and their relative positions in `position_bits` bits with filler zeros
  (Han et al., ICLR 2016, Sec. 3-4). Where plain float32 values (dense, or the
  sparse stream's values) cost less than a codebook, e.g. for weights never
  shared or quantized, those are counted instead, so the ratio is never below 1. With `huffman` both streams are Huffman
  coded (code tables not counted, as in the paper); otherwise indices take
  ceil(log2(#symbols)) bits each. Unselected float parameters count at 32
  bits; non-float leaves are not counted.

  Args:
    params: parameters, e.g. after ``prune -> share_weights``.
    where: which parameters are stored compressed (kernels by default, like
      `share_weights`; use None when biases were quantized too).
    huffman: Huffman-code the indices and positions.
    position_bits: bits per relative position (the paper: 8 conv, 5 dense).

  Returns:
    A `SizeReport`.

  >>> import jax.numpy as jnp
  >>> p = {'kernel': jnp.array([0.5, 0.5, 0.5, -1.0]), 'bias': jnp.zeros(2)}
  >>> r = size_report(p)
  >>> r.layers[0].index_bits, r.total_bits, r.bits_per_weight
  (4, 132, 22.0)
  """
  if isinstance(position_bits, bool) or not isinstance(position_bits, int) or not 1 <= position_bits <= 16:
    raise ValueError(f'position_bits must be an int in [1, 16], got {position_bits!r}.')
  everything = Selection(params, check=False)
  chosen = Selection(params, where)
  chosen_ids = set(chosen.indices)
  layers = tuple(
      _layer_size(path_str(p), np.asarray(x).astype(np.float64), huffman, position_bits)
      for p, x in chosen.selected
  )
  num_params = sum(int(np.size(x)) for _, x in everything.selected)
  uncompressed = sum(int(np.size(everything.leaves[i])) for i in everything.indices if i not in chosen_ids)
  return SizeReport(layers=layers, num_params=num_params, uncompressed_params=uncompressed)
