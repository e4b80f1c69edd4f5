"""Tests for qbound.quantize.policy: selection by path, masking, by_path, chain."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qbound import quantize as qz
from helpers import biased_mlp_params


@pytest.fixture(autouse=True, scope='module')
def strict_promotion():
  with jax.numpy_dtype_promotion('strict'):
    yield


def mlp_params(seed=0):
  return biased_mlp_params(seed)


def layer(tree, name, leaf):
  return np.asarray(tree['params'][name][leaf])


def grid_codes(x, bits):
  return np.asarray(x) / (np.abs(np.asarray(x)).max() / (2 ** (bits - 1) - 1))


def is_on_grid(x, bits):
  q = grid_codes(x, bits)
  return np.allclose(q, np.round(q), atol=1e-4)


def test_paths_for_linen_nnx_and_sequences():
  paths = [qz.path_of(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(mlp_params())]
  assert ('params', 'Dense_0', 'kernel') in paths
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  nnx_paths = {qz.path_of(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model))}
  assert nnx_paths == {('kernel',), ('bias',)}  # the Variable's .value is dropped
  seq = [qz.path_of(kp) for kp, _ in jax.tree_util.tree_leaves_with_path({'layers': [jnp.ones(1), (jnp.ones(1),)]})]
  assert seq == [('layers', 0), ('layers', 1, 0)]
  assert qz.path_str(('layers', 1, 'kernel')) == 'layers/1/kernel'


def test_where_forms_select_the_same_parameters():
  params = mlp_params()
  forms = [
      qz.kernels_only,
      '*/kernel',
      ['*/Dense_0/kernel', '*/Dense_1/kernel', '*/Dense_2/kernel'],
      lambda path: path[-1] == 'kernel',
  ]
  outs = [qz.uniform(params, 3, where=w) for w in forms]
  for out in outs:
    for name in ('Dense_0', 'Dense_1', 'Dense_2'):
      np.testing.assert_array_equal(layer(out, name, 'kernel'), layer(outs[0], name, 'kernel'))
      np.testing.assert_array_equal(layer(out, name, 'bias'), layer(params, name, 'bias'))
  with pytest.raises(ValueError, match='`where` must be'):
    qz.uniform(params, 3, where=3)


def test_unselected_and_non_float_leaves_untouched():
  tree = {
      'kernel': jnp.linspace(-1.0, 1.0, 6),
      'step': jnp.array(3, jnp.int32),
      'rng': jax.random.key(0),
      'name': 'mlp',
      'frozen': {'kernel': jnp.linspace(0.0, 1.0, 4)},
  }
  out = qz.uniform(tree, 2, where=lambda p: p[0] != 'frozen')
  assert out['step'] is tree['step'] and out['rng'] is tree['rng'] and out['name'] == 'mlp'
  assert out['frozen']['kernel'] is tree['frozen']['kernel']
  assert set(np.asarray(out['kernel']).tolist()) <= {-1.0, 0.0, 1.0}


def test_by_path_first_and_last_8_bits_rest_4_kernels_only():
  params = mlp_params(1)
  policy = qz.by_path([
      (['*/Dense_0/kernel', '*/Dense_2/kernel'], qz.uniform_quantizer(8)),
      ('*/kernel', qz.uniform_quantizer(4)),
  ])
  out = policy(params)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
  for name, bits in (('Dense_0', 8), ('Dense_1', 4), ('Dense_2', 8)):
    assert is_on_grid(layer(out, name, 'kernel'), bits)
    assert np.abs(np.round(grid_codes(layer(out, name, 'kernel'), bits))).max() == 2 ** (bits - 1) - 1
    np.testing.assert_array_equal(layer(out, name, 'bias'), layer(params, name, 'bias'))
  np.testing.assert_array_equal(
      layer(out, 'Dense_1', 'kernel'), layer(qz.uniform(params, 4), 'Dense_1', 'kernel')
  )
  assert not is_on_grid(layer(out, 'Dense_0', 'kernel'), 4)


def test_by_path_first_match_wins_and_none_keeps():
  params = mlp_params(2)
  out = qz.by_path({'*/Dense_1/*': None, '*': qz.binary_quantizer()})(params)
  np.testing.assert_array_equal(layer(out, 'Dense_1', 'kernel'), layer(params, 'Dense_1', 'kernel'))
  assert len(np.unique(layer(out, 'Dense_0', 'kernel'))) == 2
  assert len(np.unique(layer(out, 'Dense_2', 'bias'))) <= 2
  with pytest.raises(ValueError, match='pair'):
    qz.by_path([qz.uniform_quantizer(4)])


def test_masked_hides_other_parameters_from_global_transforms():
  params = mlp_params(3)
  out = qz.masked(qz.pruner(0.5, scope='global', where=None), '*/Dense_1/*')(params)
  d1 = np.concatenate([layer(out, 'Dense_1', 'kernel').ravel(), layer(out, 'Dense_1', 'bias').ravel()])
  assert np.sum(d1 == 0) == (8 * 8 + 8) // 2
  for name in ('Dense_0', 'Dense_2'):
    np.testing.assert_array_equal(layer(out, name, 'kernel'), layer(params, name, 'kernel'))


def test_masked_and_by_path_work_under_jit_and_nnx():
  model = nnx.Sequential(nnx.Linear(5, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
  state = nnx.state(model, nnx.Param)
  policy = qz.by_path([('layers/0/kernel', qz.uniform_quantizer(8)), ('*kernel', qz.ternary_quantizer())])
  out = jax.jit(policy)(state)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(state)
  assert is_on_grid(out['layers'][0]['kernel'][...], 8)
  assert len(np.unique(np.asarray(out['layers'][2]['kernel'][...]))) <= 3
  np.testing.assert_array_equal(out['layers'][2]['bias'][...], state['layers'][2]['bias'][...])


def test_chain_order_and_validation():
  params = {'kernel': jnp.array([0.2, -1.0, 0.55, 0.9])}
  a, b = qz.pruner(0.5), qz.uniform_quantizer(2)
  np.testing.assert_array_equal(qz.chain(a, b)(params)['kernel'], b(a(params))['kernel'])
  assert qz.chain()(params) is params
  with pytest.raises(ValueError, match='callables'):
    qz.chain(a, 4)


def test_map_selected_passes_paths():
  seen = []
  qz.map_selected(lambda path, x: seen.append(path) or x, mlp_params(), qz.biases_only)
  assert seen == [('params', f'Dense_{i}', 'bias') for i in range(3)]


# --- only parameters, never model state; patterns that match nothing ----------------------------


class _ConvBN(nn.Module):
  """Dense, batch norm (inference form), dense: model.init gives 'params' and 'batch_stats'."""

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))
    return nn.Dense(2)(nn.relu(x))


def _linen_variables():
  variables = _ConvBN().init(jax.random.key(0), jnp.zeros(3))
  # A small variance, as trained nets have: on any 4-bit grid scaled to these values it becomes 0.
  stats = {'mean': jnp.linspace(-0.3, 0.2, 4), 'var': jnp.array([1e-4, 2e-4, 5e-2, 1.0])}
  return {'params': variables['params'], 'batch_stats': {'BatchNorm_0': stats}}


@pytest.mark.parametrize('quantizer', [
    qz.uniform_quantizer(4), qz.fixed_point_quantizer(4), qz.power_of_two_quantizer(3), qz.ternary_quantizer(),
    qz.binary_quantizer(), qz.float_quantizer('float8_e4m3'), qz.pruner(0.5, where=None),
])
def test_whole_linen_variables_keep_batch_norm_statistics(quantizer):
  variables = _linen_variables()
  out = quantizer(variables)
  for leaf in ('mean', 'var'):
    assert out['batch_stats']['BatchNorm_0'][leaf] is variables['batch_stats']['BatchNorm_0'][leaf]
  assert not np.array_equal(layer(out, 'Dense_0', 'kernel'), layer(variables, 'Dense_0', 'kernel'))


def test_whole_linen_variables_keep_statistics_unless_given_alone():
  """The README's quick start passes model.init's whole output: with batch norm, the quantized copy
  keeps the statistics, so f and fq differ only by their weights."""
  variables = _linen_variables()
  q = qz.uniform(variables, bits=8)
  np.testing.assert_array_equal(q['batch_stats']['BatchNorm_0']['var'], variables['batch_stats']['BatchNorm_0']['var'])
  # The statistics collection on its own is transformed when asked for explicitly.
  alone = qz.uniform(variables['batch_stats'], bits=2)
  assert not np.array_equal(alone['BatchNorm_0']['var'], variables['batch_stats']['BatchNorm_0']['var'])


def test_nnx_state_keeps_batch_stats_and_rng_state():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(3, 4, rngs=rngs)
      self.bn = nnx.BatchNorm(4, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
      return self.drop(self.bn(self.lin(x)))

  model = Net(nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)  # the README's nnx recipe
  state['bn']['var'][...] = jnp.array([1e-4, 2e-4, 5e-2, 1.0])
  out = qz.uniform(state, bits=4)
  np.testing.assert_array_equal(out['bn']['var'][...], state['bn']['var'][...])
  np.testing.assert_array_equal(out['bn']['mean'][...], state['bn']['mean'][...])
  assert is_on_grid(out['lin']['kernel'][...], 4)
  assert not np.array_equal(out['lin']['kernel'][...], state['lin']['kernel'][...])
  nnx.merge(graphdef, out)(jnp.ones(3))  # still a working model


def test_parameter_mask():
  assert qz.policy.parameter_mask({'params': {}, 'batch_stats': {}}, [('params', 'a'), ('batch_stats', 'b')]) == [
      True, False]
  assert qz.policy.parameter_mask({'w': jnp.ones(2)}, [('w',)]) == [True]


@pytest.mark.parametrize('where', ['*/kernl', ['*/kernel', '*/bais'], 'params/Dense_9/*'])
def test_a_pattern_that_matches_nothing_raises(where):
  params = mlp_params()
  with pytest.raises(ValueError, match='matches nothing') as err:
    qz.uniform(params, 4, where=where)
  message = str(err.value)
  assert "'params/Dense_0/kernel'" in message  # real paths, to compare the typo with
  bad = where if isinstance(where, str) else where[1]
  assert repr(bad) in message


def test_patterns_that_match_nothing_raise_in_every_form():
  params = mlp_params()
  with pytest.raises(ValueError, match="'\\*/kernl' matches nothing"):
    qz.masked(qz.uniform_quantizer(4), '*/kernl')(params)
  with pytest.raises(ValueError, match="'\\*/bais' matches nothing"):
    qz.by_path([('*/kernel', qz.uniform_quantizer(4)), ('*/bais', None)])(params)
  with pytest.raises(ValueError, match='empty list of patterns'):
    qz.uniform(params, 4, where=[])
  with pytest.raises(ValueError, match='no float parameters'):
    qz.uniform({'step': jnp.array(1, jnp.int32)}, 4, where='*')
  # Without a pattern too: a tree with no float array (a module object, None, Python floats) would
  # come back unchanged, and its "quantized copy" certify at an error of 0.
  for tree in (nn.Dense(3), None, {'w': [0.37, -1.2]}):
    with pytest.raises(ValueError, match='no float parameters to transform'):
      qz.uniform(tree, 4)
  with pytest.raises(ValueError, match='Python floats'):
    qz.prune({'w': [0.37, -1.2]}, sparsity=0.5)
  # Patterns never match statistics, so one aimed only at them matches nothing.
  with pytest.raises(ValueError, match='matches nothing'):
    qz.uniform(_linen_variables(), 4, where='batch_stats/*')
  # Predicates are functions: selecting nothing with one is allowed (biases of a bias-free net).
  out = qz.uniform(params, 4, where=lambda path: False)
  np.testing.assert_array_equal(layer(out, 'Dense_0', 'kernel'), layer(params, 'Dense_0', 'kernel'))
