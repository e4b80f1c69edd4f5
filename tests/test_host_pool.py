"""The open pieces' pool of qbound.bounds.host_bab: the same rows as a list kept by hand, whatever
the order of additions, replacements and removals."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qbound.bounds.host_pool import PiecePool

OPS = st.lists(st.tuples(st.sampled_from(["add", "put", "remove"]), st.integers(1, 40), st.integers(0, 10**6)),
               max_size=30)


@settings(max_examples=30, deadline=None)
@given(ops=OPS)
def test_pool_matches_a_list(ops):
  rng = np.random.default_rng(0)
  reference = {}  # slot -> (row, bound)
  first = rng.normal(size=(3, 4))
  pool = PiecePool(dict(x=first), first[:, 0], capacity=2)
  reference.update({i: (first[i], first[i, 0]) for i in range(3)})
  for op, k, seed in ops:
    r = np.random.default_rng(seed)
    slots = np.array(sorted(reference))
    if op == "add":
      rows = r.normal(size=(k, 4))
      new = pool.add(dict(x=rows), rows[:, 0])
      assert len(set(new.tolist())) == k and not set(new.tolist()) & set(reference)
      reference.update({int(s): (row, row[0]) for s, row in zip(new, rows)})
    elif len(slots):
      pick = r.choice(slots, size=min(k, len(slots)), replace=False)
      if op == "put":
        rows = r.normal(size=(len(pick), 4))
        pool.put(pick, dict(x=rows), rows[:, 0])
        reference.update({int(s): (row, row[0]) for s, row in zip(pick, rows)})
      else:
        pool.remove(pick)
        for s in pick:
          del reference[int(s)]
    assert pool.count == len(reference)
    assert sorted(pool.open_slots().tolist()) == sorted(reference)
    for s, (row, bound) in reference.items():
      assert np.array_equal(pool.fields["x"][s], row) and pool.bound[s] == bound
