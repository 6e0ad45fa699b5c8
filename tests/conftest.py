"""Shared fixtures: a tiny config and its train state, built once per test session."""

import functools
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The tests' own persistent compilation cache (tests/helpers_scale.py: ~/.cache/mstkd_jax/
# xla_test_cache, or MSTKD_TEST_XLA_CACHE), for this process and every command the tests start,
# set before jax is imported: a program compiles once per machine, and the commands' default
# cache (mstkd_jax/compile_cache.py) is left alone. tests/test_compile_cache.py clears it for
# its own processes.
from tests.helpers_scale import xla_cache_dir  # pylint: disable=wrong-import-position
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', xla_cache_dir())


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end tests (deselect with -m "not slow")')


@pytest.fixture(scope='session')
def tiny_config():
  from configs.brats import get_config
  return get_config('tiny')


def make_tiny_batch(config, batch_size=2, seed=0):
  """A fixed batch with a cube 'tumour' that is bright in every modality."""
  rs = np.random.RandomState(seed)
  shape = (batch_size,) + tuple(config.data.input_shape)
  image = rs.rand(*shape, 4).astype(np.float32) * 0.2
  label = np.zeros(shape + (4,), np.float32)
  label[:, 8:20, 10:22, 9:19, 1] = 1.0
  label[:, 11:17, 13:19, 11:17, 1] = 0.0
  label[:, 11:17, 13:19, 11:17, 2] = 1.0
  image[label[..., 1] > 0] += 0.6
  image[label[..., 2] > 0] += 0.9
  label[..., 3] = 1.0 - label[..., :3].max(-1)
  return {'image': image, 'label': label}


@pytest.fixture(scope='session')
def tiny_batch(tiny_config):
  return make_tiny_batch(tiny_config)


@pytest.fixture(scope='session')
def tiny_state(tiny_config):
  """The tiny config's initial TrainState (read-only: tests must not donate it)."""
  import jax
  from mstkd_jax.models import build
  init = jax.jit(functools.partial(build.init_state, tiny_config, steps_per_epoch=10))
  return init(jax.random.key(0))


@pytest.fixture(scope='session')
def exported(tmp_path_factory):
  """The student (and teacher) of the shared :tiny run exported once (helpers_eval)."""
  from tests import helpers_eval
  return helpers_eval.exported(tmp_path_factory)
