"""Training against modality dominance: size-weighted subset draws and the superset
consistency term (``train.subset_weighting``, ``loss.superset_weight``)."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from mstkd_jax import losses, metrics, modalities
from mstkd_jax import step as step_lib


def test_size_weighting_is_proportional_to_the_number_of_modalities():
  masks = modalities.subset_masks()
  p = modalities.subset_probabilities(masks, 'size')
  sizes = masks.sum(1)
  np.testing.assert_allclose(p, sizes / 32.0, rtol=1e-6)
  assert p[-1] == pytest.approx(4 / 32) and p[0] == pytest.approx(1 / 32)
  assert modalities.subset_probabilities(masks, 'uniform') is None
  with pytest.raises(ValueError, match='subset_weighting'):
    modalities.subset_probabilities(masks, 'loss')


def test_uniform_draws_are_unchanged():
  """The default keeps the random stream of earlier runs (same key -> same subsets)."""
  masks = modalities.subset_masks()
  key = jax.random.key(3)
  expected = masks[np.asarray(jax.random.randint(key, (5,), 0, 15))]
  np.testing.assert_array_equal(modalities.draw_masks(key, 5, masks), expected)


def test_weighted_draws_follow_the_probabilities():
  masks = modalities.subset_masks()
  p = modalities.subset_probabilities(masks, 'size')
  drawn = np.asarray(modalities.draw_masks(jax.random.key(0), 40000, masks, p))
  full = np.mean(drawn.sum(1) == 4)
  single = np.mean(drawn.sum(1) == 1)
  assert full == pytest.approx(4 / 32, abs=0.01)
  assert single == pytest.approx(4 / 32, abs=0.01)      # four singles at 1/32 each


def test_neighbours_differ_by_one_modality():
  masks = jnp.asarray(np.repeat(modalities.subset_masks(), 40, axis=0))
  nb, is_superset = modalities.neighbour_masks(jax.random.key(1), masks)
  nb, is_superset, masks = np.asarray(nb), np.asarray(is_superset), np.asarray(masks)
  assert set(np.unique(nb)) <= {0.0, 1.0}
  np.testing.assert_array_equal(np.abs(nb - masks).sum(1), 1.0)
  full = masks.sum(1) == 4
  np.testing.assert_array_equal(is_superset, ~full)
  np.testing.assert_array_equal(nb.sum(1), masks.sum(1) + np.where(full, -1, 1))
  # every absent modality of FLAIR alone is added at some point, every one removed from full
  flair = masks[:, 0] == 1
  flair &= masks.sum(1) == 1
  assert {tuple(r) for r in nb[flair]} == {(1, 1, 0, 0), (1, 0, 1, 0), (1, 0, 0, 1)}
  assert len({tuple(r) for r in nb[full]}) == 4


def test_region_probs_match_the_metric_regions():
  rs = np.random.RandomState(0)
  channels = (rs.rand(2, 5, 5, 5, 4) > 0.6).astype(np.float32)
  regions = np.asarray(losses.region_probs(jnp.asarray(channels)))
  expected = metrics.region_masks(channels)
  for i, name in enumerate(metrics.REGIONS):
    np.testing.assert_array_equal(regions[..., i] > 0.5, expected[name])


def _probs_and_label():
  y = np.zeros((1, 6, 6, 6, 4), np.float32)
  y[0, 1:5, 1:5, 1:5, 1] = 1.0
  y[0, 2:4, 2:4, 2:4, 2] = 1.0
  y[..., 3] = 1.0 - y[..., :3].max(-1)
  good = jnp.asarray(0.9 * y + 0.05)
  bad = jnp.asarray(np.full_like(y, 0.3))
  return good, bad, jnp.asarray(y)


def test_superset_term_penalises_only_a_worse_larger_input():
  good, bad, y = _probs_and_label()
  assert float(losses.superset_consistency_loss(good, bad, y)) == 0.0
  excess = np.sum(np.maximum(np.asarray(losses.region_dice_per_sample(bad, y))
                             - np.asarray(losses.region_dice_per_sample(good, y)), 0.0))
  assert excess > 0.1
  assert float(losses.superset_consistency_loss(bad, good, y)) == pytest.approx(excess,
                                                                                rel=1e-5)
  g_large, g_small = jax.grad(losses.superset_consistency_loss, argnums=(0, 1))(bad, good, y)
  assert float(jnp.abs(g_large).sum()) > 0.0
  assert float(jnp.abs(g_small).sum()) == 0.0, 'the smaller input is the bar, not trained'


def test_total_loss_needs_the_neighbour(tiny_config):
  cfg = config_dict.ConfigDict(tiny_config.loss.to_dict())
  cfg.update(superset_weight=1.0, lambda_mstkd=0.0, lambda_logit=0.0, lambda_gsme=0.0,
             content_weight=0.0)
  good, bad, y = _probs_and_label()
  out = types.SimpleNamespace(probs=good)
  with pytest.raises(ValueError, match='superset_weight'):
    losses.total_loss(out, out, y, None, 0, cfg)
  terms = losses.total_loss(out, out, y, None, 0, cfg, neighbour=(bad, jnp.asarray([True])))
  assert float(terms['superset']) > 0.1       # the larger input (bad) is worse
  assert float(terms['total']) == pytest.approx(
      float(terms['dice'] + terms['superset']), rel=1e-6)


@pytest.fixture(scope='module')
def candidate_config(tiny_config):
  c = config_dict.ConfigDict(tiny_config.to_dict())
  c.loss.superset_weight = 1.0
  c.train.subset_weighting = 'size'
  return c


def test_superset_term_trains_the_student_only(candidate_config, tiny_state, tiny_batch):
  image = jnp.asarray(tiny_batch['image'])
  small = jnp.asarray([[1., 0., 0., 0.], [1., 1., 1., 1.]])
  nb, is_superset = modalities.neighbour_masks(jax.random.key(0), small)

  def superset_term(params):
    _, (terms, *_rest) = step_lib.network_objective(
        params, tiny_state.batch_stats, tiny_state.disc_params, image,
        modalities.apply_masks(image, small), jnp.asarray(tiny_batch['label']),
        (jax.random.key(1), jax.random.key(2)), 0, candidate_config,
        neighbour=(modalities.apply_masks(image, nb), is_superset))
    return terms['superset']

  value, grads = jax.jit(jax.value_and_grad(superset_term))(tiny_state.params)
  assert np.isfinite(float(value))
  leaves = lambda tree: float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))
  assert leaves(grads['teacher']) == 0.0
  if float(value) > 0:
    assert leaves(grads['student']) > 0.0


@pytest.mark.slow
def test_training_step_with_both_candidates(candidate_config, tiny_state, tiny_batch):
  fn = jax.jit(functools.partial(step_lib.train_step, config=candidate_config,
                                 steps_per_epoch=10))
  state = jax.tree.map(jnp.copy, tiny_state)
  new_state, m = fn(state, tiny_batch, jax.random.key(7))
  m = jax.device_get(m)
  assert bool(m['finite']) and 'superset' in m and np.isfinite(m['superset'])
  parts = losses.weighted_terms(m, candidate_config.loss)
  assert float(m['total']) == pytest.approx(float(sum(parts.values())), rel=1e-5)
  assert 'superset' in parts
  assert int(new_state.step) == 1
  assert step_lib.subset_probabilities(candidate_config) is not None
