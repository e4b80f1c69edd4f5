"""The code blocks of docs/quant-libraries.md run as written and do what the page says.

Each ```python block of the guide runs in a namespace holding what the page assumes the reader has:
a 4-16-2 linen MLP ``model`` whose layers take AQT's ``dot_general_cls`` (``MLP``), its ``params``,
an input ``box``, ``x0``, a ``calibration_batch`` and an unbatched ``f``. The blocks' own
``qb.certify(f, fq, box)`` runs with ``method="interval"`` to keep the test cheap. Checked: every
block's f and f_q pair (the page's table says so for each of them) and its certificate holds against
sampling of the libraries' own functions. The guide's prose (what pairs, how it is bounded) is tested
in ``test_quant_libraries.py``; this file catches the page drifting from the libraries' APIs.
"""

import functools
import pathlib
import types

import jax
import jax.numpy as jnp
import pytest

import helpers as H
import qbound as qb

flax_linen = pytest.importorskip("flax.linen")

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "quant-libraries.md"
BLOCKS = H.python_blocks(GUIDE)


class MLP(flax_linen.Module):
  """4-16-2 with biases; ``dot_general_cls`` lets AQT replace the products (as on the page)."""
  dot_general_cls: object = None

  @flax_linen.compact
  def __call__(self, x):
    extra = {} if self.dot_general_cls is None else {"dot_general_cls": self.dot_general_cls}
    x = flax_linen.relu(flax_linen.Dense(16, **extra)(x))
    return flax_linen.Dense(2, **extra)(x)


def _namespace():
  model = MLP()
  params = model.init(jax.random.key(3), jnp.zeros((1, 4)))
  cheap = types.SimpleNamespace(**{name: getattr(qb, name) for name in dir(qb) if not name.startswith("_")})
  cheap.certify = functools.partial(qb.certify, method="interval")
  return dict(jax=jax, jnp=jnp, functools=functools, qb=cheap, MLP=MLP, model=model, params=params,
              box=qb.Box(-jnp.ones(4), jnp.ones(4)), x0=jnp.zeros(4),
              calibration_batch=jax.random.uniform(jax.random.key(5), (64, 4), minval=-1, maxval=1),
              f=functools.partial(model.apply, params))


def test_the_guide_has_its_blocks():
  assert len(BLOCKS) == 4, f"{GUIDE.name} has {len(BLOCKS)} python blocks; update this test's ids"


@pytest.mark.parametrize("index", range(4), ids=["qwix-weights", "qwix-static", "qwix-dynamic", "aqt-weights"])
def test_block_runs_pairs_and_holds(index):
  library = "aqt" if "aqt" in BLOCKS[index] else "qwix"
  pytest.importorskip(library if library == "qwix" else "aqt.jax.v2",
                      reason=f"{library} is not installed (pip install 'qbound[{library}]')")
  ns = _namespace()
  if library == "qwix" and "import qwix" not in BLOCKS[index]:
    exec("import qwix", ns)  # the page's later qwix blocks continue its first
  exec(BLOCKS[index], ns)
  f, fq, box = ns["f"], ns["fq"], ns["box"]
  assert qb.merge(f, fq, box).paired
  cert = ns.get("cert") or qb.certify(f, fq, box, method="interval")
  xs = jax.random.uniform(jax.random.key(1), (2000, 4), minval=box.lower, maxval=box.upper)
  sampled = float(jnp.max(jnp.abs(jax.vmap(f)(xs) - jax.vmap(fq)(xs))))
  assert 0 < sampled <= cert.upper
