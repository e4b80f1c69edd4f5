"""Tests for qbound.quantize.coding: Huffman code lengths and the size report."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbound import quantize as qz


def test_huffman_textbook_example():
  # Cormen et al., Introduction to Algorithms, Sec. 16.3: 224 bits for 100 characters.
  counts = {'a': 45, 'b': 13, 'c': 12, 'd': 16, 'e': 9, 'f': 5}
  lengths = qz.huffman_code_lengths(counts)
  assert lengths == {'a': 1, 'b': 3, 'c': 3, 'd': 3, 'e': 4, 'f': 4}
  assert sum(counts[s] * lengths[s] for s in counts) == 224
  assert qz.huffman_bits('a' * 45 + 'b' * 13 + 'c' * 12 + 'd' * 16 + 'e' * 9 + 'f' * 5) == 224


def test_huffman_edge_cases():
  assert qz.huffman_code_lengths({}) == {}
  assert qz.huffman_code_lengths({'x': 7}) == {'x': 1}
  assert qz.huffman_code_lengths({'x': 1, 'y': 100}) == {'x': 1, 'y': 1}
  with pytest.raises(ValueError, match='positive integers'):
    qz.huffman_code_lengths({'x': 0, 'y': 1})


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(1, 1000), min_size=2, max_size=40))
def test_huffman_is_complete_and_within_entropy_bounds(counts):
  lengths = qz.huffman_code_lengths(dict(enumerate(counts)))
  assert sum(2.0 ** -l for l in lengths.values()) == pytest.approx(1.0)  # Kraft equality: a full tree
  n = sum(counts)
  avg = sum(c * lengths[i] for i, c in enumerate(counts)) / n
  entropy = -sum(c / n * math.log2(c / n) for c in counts)
  assert entropy - 1e-9 <= avg < entropy + 1
  assert avg <= math.ceil(math.log2(len(counts)))  # never worse than fixed width


def test_size_report_dense_hand_example():
  p = {'kernel': jnp.array([0.5, 0.5, 0.5, -1.0, 0.25, 0.25]), 'bias': jnp.zeros(2), 'step': jnp.array(1)}
  r = qz.size_report(p)
  (layer,) = r.layers
  # Huffman on counts {0.5: 3, 0.25: 2, -1.0: 1}: lengths 1, 2, 2 -> 3 + 4 + 2 bits.
  assert (layer.sparse, layer.index_bits, layer.codebook_bits) == (False, 9, 96)
  assert r.num_params == 8 and r.uncompressed_params == 2
  assert r.total_bits == 9 + 96 + 64
  assert r.original_bytes == 32 and r.compressed_bytes == r.total_bits / 8
  assert r.bits_per_weight == r.total_bits / 8
  assert r.compression_ratio == pytest.approx(32 / (169 / 8))
  fixed = qz.size_report(p, huffman=False)
  assert fixed.layers[0].index_bits == 6 * 2


def test_size_report_sparse_hand_example_with_filler():
  w = np.zeros(100, np.float32)
  w[[0, 40, 41]] = [1.0, 1.0, 2.0]
  # Gaps 1, 40, 1; with 5 position bits (span 32) the gap of 40 needs one filler
  # (advance 32, zero symbol) and then a gap of 8. Index stream 0, 1, 1, 2 and
  # gap stream 32, 1, 8, 1.
  fixed = qz.size_report({'kernel': w}, huffman=False, position_bits=5).layers[0]
  assert fixed.sparse and (fixed.index_bits, fixed.position_bits) == (4 * 2, 4 * 5)
  r = qz.size_report({'kernel': w}, position_bits=5)
  layer = r.layers[0]
  assert (layer.num_nonzero, layer.codebook_size, layer.codebook_bits) == (3, 2, 64)
  assert (layer.index_bits, layer.position_bits) == (6, 6)  # Huffman lengths 1, 2, 2 in both streams
  assert r.total_bits == 76 and r.compression_ratio == pytest.approx(400 / 9.5)


def test_size_report_prefers_dense_for_few_zeros():
  w = np.array([1.0, 2.0, 0.0, 1.0] * 8, np.float32)
  layer = qz.size_report({'kernel': w}).layers[0]
  assert not layer.sparse and layer.position_bits == 0


def test_size_report_after_deep_compression():
  key = jax.random.key(0)
  params = {'params': {'Dense_0': {'kernel': jax.random.normal(key, (64, 32)), 'bias': jnp.zeros(32)}}}
  out = qz.share_weights(qz.prune(params, 0.9), bits=4)
  r = qz.size_report(out)
  assert r.layers[0].codebook_size <= 16 and r.layers[0].sparse
  assert r.compression_ratio > 10
  uncompressed = qz.size_report(params)
  # Distinct float32 values: a codebook would cost more than the weights, so they are stored raw.
  assert uncompressed.layers[0].raw and uncompressed.compression_ratio == 1
  pruned = qz.size_report(qz.prune(params, 0.9))
  assert pruned.layers[0].raw and pruned.layers[0].sparse and pruned.layers[0].codebook_bits == 0
  assert 2 < pruned.compression_ratio < 32 / 3  # 10% of the values, plus their positions
  with pytest.raises(ValueError, match='position_bits'):
    qz.size_report(out, position_bits=0)
