"""Shapes of every named output and the exact parameter counts, at full size (eval_shape)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.brats import get_config
from mstkd_jax.models import build
from mstkd_jax.models.discriminator import StyleDiscriminator, final_kernel
from mstkd_jax.models.mstkdnet import network_from_config


def _init_shapes(config):
  net = network_from_config(config)
  x = jnp.zeros(build.input_shape(config))
  variables = jax.eval_shape(
      lambda: net.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x,
                       train=False))
  outputs = jax.eval_shape(lambda v: net.apply(v, x, train=False), variables)
  return variables, outputs


@pytest.fixture(scope='module')
def full_size():
  return _init_shapes(get_config())


def test_full_size_parameter_counts_match_the_authors(full_size):
  variables, _ = full_size
  assert build.count_params(variables['params']) == 154_335_684
  abstract = build.abstract_state(get_config())
  assert build.count_params(abstract.disc_params) == 3_149_249
  total = build.count_params(abstract.params) + build.count_params(abstract.disc_params)
  assert total == 311_820_617


def test_full_size_output_shapes(full_size):
  _, out = full_size
  assert out.logits.shape == out.probs.shape == (1, 160, 192, 128, 4)
  for name in ('style', 'content', 'c3d'):
    assert getattr(out, name).shape == (1, 20, 24, 16, 128), name
  assert [a.shape for a in out.attention] == [(1, 12, 120, 120)] * 4
  assert [f.shape for f in out.features] == [(1, 20, 24, 16, 64), (1, 40, 48, 32, 128),
                                            (1, 20, 24, 16, 256), (1, 10, 12, 8, 512)]


def test_batch_norm_statistics_exist_for_every_decoder_block(full_size):
  variables, _ = full_size
  stats = jax.tree_util.tree_leaves_with_path(variables['batch_stats'])
  # 17 BatchNorms in the UNETR decoder (as many running_mean entries as the authors'
  # state_dict lists), a mean and a var each.
  assert len(stats) == 2 * 17


def test_position_embedding_follows_the_input_size():
  config = get_config()
  config.data.input_shape = (128, 192, 128)
  variables, _ = _init_shapes(config)
  assert build.count_params(variables['params']) == 154_317_252


def test_discriminator_adapts_to_small_maps():
  assert final_kernel((20, 24, 16), 3) == (2, 3, 2)
  disc = StyleDiscriminator((8, 16))
  s = jnp.zeros((2, 4, 4, 4, 32))
  v = disc.init(jax.random.key(0), s)
  assert disc.apply(v, s).shape == (2,)
  with pytest.raises(ValueError, match='too small'):
    StyleDiscriminator((8, 16, 32)).init(jax.random.key(0), s)


def test_bad_input_shape_is_a_clear_error(tiny_config):
  net = network_from_config(tiny_config)
  with pytest.raises(ValueError, match='multiples of 16'):
    jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 30, 32, 32, 4)),
                                    train=False))


def test_tiny_forward_is_finite_and_probabilities_are_sigmoids(tiny_config, tiny_state,
                                                               tiny_batch):
  probs = jax.jit(lambda p, s, x: build.predict_probs(p, s, x, config=tiny_config))(
      tiny_state.params['student'], tiny_state.batch_stats['student'], tiny_batch['image'])
  probs = np.asarray(probs)
  assert probs.shape == tiny_batch['label'].shape
  assert np.all((probs >= 0) & (probs <= 1))
