"""Products written with their operands swapped pair (qbound.trace.rules, qbound.trace.simplify).

qwix's PTQ rewrites attention's ``einsum("qhd,khd->hqk", q, k)`` as the product of ``k`` and ``q``
followed by a transpose. The tracer builds every product of two nodes with the earlier node first
and transposes back; the transpose after it then cancels against the model's own, so f and f_q
trace to the same layers and the merged network pairs (differential bounds apply).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound import graph as G


def _qk(swapped: bool):
  def f(x, wq, wk):
    q, k = (x @ wq).reshape(3, 2, 2), (x @ wk).reshape(3, 2, 2)
    if swapped:  # what qwix writes: k first, then the transpose back
      return jnp.transpose(jnp.einsum("khd,qhd->hkq", k, q), (0, 2, 1))
    return jnp.einsum("qhd,khd->hqk", q, k)
  return f


@pytest.mark.parametrize("spec", ["qhd,khd->hqk", "khd,qhd->hkq", "qd,kd->qk", "hqd,hkd->qhk", "qd,d->q"])
def test_swapped_products_trace_to_their_values(spec):
  """The canonical order changes the layers, never the function (batch, free and contracted axes
  in every position)."""
  lhs, rest = spec.split(",")
  rhs, out = rest.split("->")
  sizes = {"q": 3, "k": 4, "h": 2, "d": 5}
  x = jax.random.normal(jax.random.key(0), (12,))
  wa = jax.random.normal(jax.random.key(1), (12, int(np.prod([sizes[c] for c in lhs]))))
  wb = jax.random.normal(jax.random.key(2), (12, int(np.prod([sizes[c] for c in rhs]))))

  def fn(x):
    a = (x @ wa).reshape([sizes[c] for c in lhs])
    b = jnp.tanh(x @ wb).reshape([sizes[c] for c in rhs])  # b is traced after a: the product is swapped
    return jnp.einsum(f"{rhs},{lhs}->{out}", b, a)

  graph = qb.trace(fn, x)
  for key in range(3):
    xs = jax.random.normal(jax.random.key(10 + key), (12,))
    np.testing.assert_allclose(graph(xs), fn(xs), rtol=1e-5, atol=1e-5)


def test_swapped_attention_scores_pair():
  x = jax.random.normal(jax.random.key(0), (3, 4))
  wq, wk = jax.random.normal(jax.random.key(1), (4, 4)), jax.random.normal(jax.random.key(2), (4, 4))
  f = functools.partial(_qk(False), wq=wq, wk=wk)
  fq = functools.partial(_qk(True), wq=jnp.round(wq * 8) / 8, wk=jnp.round(wk * 8) / 8)
  gf, gq = qb.trace(f, x), qb.trace(fq, x)
  assert [n.kind for n in gf.nodes] == [n.kind for n in gq.nodes]
  assert sum(n.op is not None and n.op.name == "transpose" for n in gq.nodes) == \
         sum(n.op is not None and n.op.name == "transpose" for n in gf.nodes)  # the two transposes cancelled
  np.testing.assert_allclose(gq(x), fq(x), rtol=1e-5, atol=1e-5)
  assert qb.merge(f, fq, x).paired


def test_two_transposes_compose():
  """A transpose of a transpose that do not cancel become one transpose with the composed order."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  fn = lambda x: jnp.transpose(jnp.transpose(jnp.tanh(x), (1, 2, 0)), (2, 0, 1)).transpose(1, 0, 2) * 1.5
  graph = qb.trace(fn, x)
  assert sum(n.op is not None and n.op.name == "transpose" for n in graph.nodes) == 1
  np.testing.assert_allclose(graph(x), fn(x), rtol=1e-6)


class _SwappedAttention(nn.Module):
  """The tiny attention block of tests.helpers, its scores written k-first as qwix writes them."""

  swapped: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    q, k, v = nn.Dense(2)(h), nn.Dense(2)(h), nn.Dense(2)(h)
    scores = jnp.einsum("kd,qd->kq", k, q).T if self.swapped else jnp.einsum("qd,kd->qk", q, k)
    a = jax.nn.softmax(scores, axis=-1)
    return (x + jnp.einsum("vd,qv->qd", v, a)).sum(0)


def _swapped_pair(bits=4):
  x0 = jax.random.normal(jax.random.key(3), (2, 2))
  params = _SwappedAttention().init(jax.random.key(4), x0)
  f = functools.partial(_SwappedAttention().apply, params)
  fq = functools.partial(_SwappedAttention(swapped=True).apply, qb.quantize.uniform(params, bits=bits))
  return f, fq, x0


def test_swapped_attention_block_pairs():
  f, fq, x0 = _swapped_pair()
  merged = qb.merge(f, fq, x0)
  assert merged.paired
  np.testing.assert_allclose(merged(x0), f(x0) - fq(x0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 30 s: CROWN's steps for both graphs compile
def test_swapped_attention_block_interval_diff_bounds_hold():
  f, fq, x0 = _swapped_pair()
  box = qb.Box(x0 - 0.02, x0 + 0.02)
  merged = qb.merge(f, fq, box)
  _, _, d = qb.bounds.diff_bounds(merged.f_graph, merged.fq_graph, box, symbolic=False)
  lower, upper = d[merged.f_graph.output]
  xs = jax.random.uniform(jax.random.key(5), (4000, *box.shape), minval=box.lower, maxval=box.upper)
  err = jax.vmap(f)(xs) - jax.vmap(fq)(xs)
  assert bool(jnp.all(jnp.isfinite(upper)) & jnp.all(err >= lower) & jnp.all(err <= upper))


@pytest.mark.slow  # ~25 s, mostly compiling the differential bounds of an attention block
def test_swapped_attention_block_diff_certificate_holds():
  """12 s on a quiet machine (30 s loaded): the differential bounds' steps compile."""
  f, fq, x0 = _swapped_pair()
  box = qb.Box(x0 - 0.02, x0 + 0.02)
  cert = qb.certify(f, fq, box, method="diff", search=H.search())
  xs = jax.random.uniform(jax.random.key(6), (4000, *box.shape), minval=box.lower, maxval=box.upper)
  err = float(jnp.max(jnp.abs(jax.vmap(f)(xs) - jax.vmap(fq)(xs))))
  assert cert.method.startswith("diff") and np.isfinite(cert.upper) and err <= cert.upper
