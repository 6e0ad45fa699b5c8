"""The training step: gradient routing, learning, determinism, a single compilation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from mstkd_jax import modalities, optim
from mstkd_jax import step as step_lib

SPE = 10


def with_overrides(config, **loss):
  c = config_dict.ConfigDict(config.to_dict())
  c.loss.update(loss)
  return c


DISTILLATION_TERMS = ('mst', 'evd', 'kl', 'agreement', 'style', 'content', 'adv')


def term_grads(config, state, batch, names=DISTILLATION_TERMS):
  """{term: d(terms[term]) / d(params)} of the network objective, in one compilation;
  the name 'sum' stands for the sum of every distillation term."""
  image = jnp.asarray(batch['image'])
  masks = jnp.asarray([[1., 0., 1., 0.]] * image.shape[0])

  def term(params, name):
    _, (terms, *_rest) = step_lib.network_objective(
        params, state.batch_stats, state.disc_params, image,
        modalities.apply_masks(image, masks), jnp.asarray(batch['label']),
        (jax.random.key(1), jax.random.key(2)), 3, config)
    if name == 'sum':
      return sum(terms[t] for t in DISTILLATION_TERMS)
    return terms[name]

  def all_grads(params):
    return {name: jax.grad(term)(params, name) for name in names}
  return jax.jit(all_grads)(state.params)


def norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


@pytest.fixture(scope='module')
def grads_default(tiny_config, tiny_state, tiny_batch):
  return term_grads(tiny_config, tiny_state, tiny_batch)


@pytest.fixture(scope='module')
def grads_stopped(tiny_config, tiny_state, tiny_batch):
  return term_grads(with_overrides(tiny_config, stop_gradient_teacher=True), tiny_state,
                    tiny_batch, names=('sum',))


def test_adversarial_term_reaches_the_student_only(grads_default):
  assert norm(grads_default['adv']['teacher']) == 0.0
  assert norm(grads_default['adv']['student']) > 0.0


@pytest.mark.parametrize('term', ['mst', 'evd', 'kl', 'agreement', 'style', 'content'])
def test_distillation_trains_both_networks_by_default(grads_default, term):
  assert norm(grads_default[term]['teacher']) > 0.0, 'by default the teacher learns from it'
  assert norm(grads_default[term]['student']) > 0.0


def test_stop_gradient_teacher_blocks_distillation(grads_stopped):
  """With the option, no distillation term (their sum) reaches the teacher; all reach the
  student."""
  assert norm(grads_stopped['sum']['teacher']) == 0.0
  assert norm(grads_stopped['sum']['student']) > 0.0


def run_steps(config, state, batch, n, lr=None, fn=None):
  if lr is not None:
    config = config_dict.ConfigDict(config.to_dict())
    config.train.learning_rate = lr
    config.train.disc_learning_rate = lr
  state = jax.tree.map(jnp.copy, state)  # never donate the shared fixture
  if fn is None:
    fn = jax.jit(functools.partial(step_lib.train_step, config=config, steps_per_epoch=SPE),
                 donate_argnums=0)
  history = []
  for _ in range(n):
    state, metrics = fn(state, batch, jax.random.key(7))
    history.append(jax.device_get(metrics))
  return state, history, fn


@pytest.fixture(scope='module')
def skip_config(tiny_config):
  """:tiny with nan_policy 'skip' (the same step as 'stop' on finite batches), so that one
  compiled step serves the learning, determinism and NaN tests."""
  c = config_dict.ConfigDict(tiny_config.to_dict())
  c.train.nan_policy = 'skip'
  return c


@pytest.fixture(scope='module')
def six_steps(skip_config, tiny_state, tiny_batch):
  return run_steps(skip_config, tiny_state, tiny_batch, 6, lr=3e-3)


def test_steps_lower_the_dice_loss(six_steps):
  _, history, _ = six_steps
  dice = [float(m['dice']) for m in history]
  assert dice[-1] < dice[0] - 0.05, dice
  assert all(bool(m['finite']) for m in history)


def test_step_compiles_once_and_updates_everything(six_steps, tiny_state):
  state, history, fn = six_steps
  assert fn._cache_size() == 1
  assert int(state.step) == 6
  for name in ('teacher', 'student'):
    # The authors' unused final LayerNorm ('encoder_norm') has no gradient; its zero bias
    # stays zero. Everything else must move.
    unchanged = [jax.tree_util.keystr(path) for (path, a), b in
                 zip(jax.tree_util.tree_leaves_with_path(state.params[name]),
                     jax.tree.leaves(tiny_state.params[name])) if np.array_equal(a, b)]
    assert unchanged == ["['Unetr']['transformer']['encoder_norm']['bias']"], unchanged
  # BatchNorm running statistics moved.
  assert not np.array_equal(jax.tree.leaves(state.batch_stats['student'])[0],
                            jax.tree.leaves(tiny_state.batch_stats['student'])[0])
  for key in ('total', 'dice', 'evd', 'mst', 'agreement', 'kl', 'adv', 'style', 'content',
              'disc', 'grad_norm_teacher', 'grad_norm_student', 'param_norm_student',
              'learning_rate'):
    assert key in history[-1], key


def test_same_seed_gives_bit_identical_parameters(six_steps, tiny_state, tiny_batch):
  state, _, fn = six_steps
  again, _, _ = run_steps(None, tiny_state, tiny_batch, 6, fn=fn)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_subsets_drawn_uniformly_and_restrictable():
  masks = modalities.subset_masks(None)
  drawn = modalities.draw_masks(jax.random.key(0), 15000, masks)
  assert drawn.shape == (15000, 4)
  assert float(jnp.min(jnp.sum(drawn, axis=1))) >= 1  # never empty
  counts = np.unique(np.asarray(drawn) @ np.array([1, 2, 4, 8]), return_counts=True)[1]
  assert len(counts) == 15 and counts.min() > 850 and counts.max() < 1150
  c = config_dict.ConfigDict({'train': {'subsets': ('1010', 'FLAIR')}})
  np.testing.assert_array_equal(step_lib.allowed_subsets(c), [[1, 0, 1, 0], [1, 0, 0, 0]])


def test_learning_rate_poly_decay(tiny_config):
  sched = optim.learning_rate_schedule(tiny_config, steps_per_epoch=10)
  lr = tiny_config.train.learning_rate
  epochs = tiny_config.train.epochs
  np.testing.assert_allclose(sched(0), lr)
  np.testing.assert_allclose(sched(15), lr * (1 - 1 / epochs) ** 0.9, rtol=1e-6)


def test_nan_skip_policy_keeps_the_old_parameters(six_steps, tiny_state, tiny_batch):
  _, _, fn = six_steps
  bad = dict(tiny_batch, image=np.full_like(tiny_batch['image'], np.nan))
  state, history, _ = run_steps(None, tiny_state, bad, 1, fn=fn)
  assert not bool(history[0]['finite'])
  assert int(state.step) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(tiny_state.params)):
    np.testing.assert_array_equal(a, b)


def test_network_loss_does_not_train_the_discriminator(six_steps, skip_config, tiny_state,
                                                       tiny_batch):
  """Changing the adversarial weight changes the student's update but not the
  discriminator's: the discriminator learns from its own loss only."""
  _, _, fn = six_steps
  a, _, _ = run_steps(None, tiny_state, tiny_batch, 1, fn=fn)
  b, _, _ = run_steps(with_overrides(skip_config, adv_epsilon=5.0), tiny_state, tiny_batch, 1,
                      lr=3e-3)
  for x, y in zip(jax.tree.leaves(a.disc_params), jax.tree.leaves(b.disc_params)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(a.params['student']), jax.tree.leaves(b.params['student'])))
  assert not any(np.array_equal(x, y) for x, y in
                 zip(jax.tree.leaves(a.disc_params), jax.tree.leaves(tiny_state.disc_params)))
