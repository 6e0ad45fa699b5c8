"""Offline distillation (``train.frozen_teacher``): the teacher starts from another run's (or an
export's) network and is never updated, while the student trains."""

import jax
import numpy as np
import pytest

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import optim
from mstkd_jax import parallel
from mstkd_jax import train
from mstkd_jax.models import build
from tests import helpers_eval


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  return helpers_eval.trained_run(tmp_path_factory)


def frozen_config(location, network=None):
  config = helpers_eval.tiny_eval_config()
  config.train.frozen_teacher = location
  config.train.frozen_teacher_network = network
  return config


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture(scope='module')
def fresh(tiny_state, tiny_config):
  """(the tiny config's initial state, its shardings): the session's state, not compiled again.
  Its networks are those of a fresh frozen-teacher run (same seed); only the optimizer state
  differs, which with_frozen_teacher does not touch."""
  mesh = parallel.make_mesh()
  shardings = train.state_shardings(tiny_config, mesh, build.abstract_state(tiny_config, 1))
  return tiny_state, shardings


def test_the_frozen_teacher_keeps_the_source_weights_and_the_student_trains(source, fresh,
                                                                            tmp_path):
  config = frozen_config(source.workdir)
  start_student = jax.device_get(fresh[0].params['student'])
  batches = train.random_batches(config, 1)
  state = train.train_loop(config, str(tmp_path / 'run'), batches, steps_per_epoch=1,
                           max_steps=2)
  assert int(state.step) == 2
  # The teacher is the source run's student, bit for bit, running statistics included.
  assert_trees_equal(state.params['teacher'], source.state.params['student'])
  assert_trees_equal(state.batch_stats['teacher'], source.state.batch_stats['student'])
  # The student moved away from its initialisation.
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                       jax.device_get(state.params['student']), start_student))
  assert max(moved) > 0
  # No Adam moments are kept for the teacher.
  n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_student = build.count_params(state.params['student'])
  assert n_moments < 2.5 * n_student, (n_moments, n_student)


def test_the_teacher_can_come_from_a_workdirs_teacher_or_an_export(source, fresh,
                                                                    tmp_path_factory):
  exported = helpers_eval.exported(tmp_path_factory)
  state, shardings = fresh
  loaded = train.with_frozen_teacher(frozen_config(source.workdir, 'teacher'), state, shardings)
  assert_trees_equal(loaded.params['teacher'], source.state.params['teacher'])
  assert_trees_equal(loaded.params['student'], state.params['student'])
  loaded = train.with_frozen_teacher(frozen_config(exported), state, shardings)
  assert_trees_equal(loaded.params['teacher'], source.state.params['student'])


def test_bad_frozen_teacher_settings_are_named(source, fresh, tmp_path):
  state, shardings = fresh
  with pytest.raises(ckpt.CheckpointError, match='train.frozen_teacher: .*nowhere'):
    train.with_frozen_teacher(frozen_config(str(tmp_path / 'nowhere')), state, shardings)
  with pytest.raises(ckpt.CheckpointError, match="frozen_teacher_network: 'both'"):
    train.with_frozen_teacher(frozen_config(source.workdir, 'both'), state, shardings)
  other = frozen_config(source.workdir)
  other.model.init_channels = 8
  with pytest.raises(ckpt.CheckpointError, match='model.init_channels: config 8, checkpoint 4'):
    train.with_frozen_teacher(other, state, shardings)


def test_only_a_named_source_freezes_the_teacher():
  config = helpers_eval.tiny_eval_config()
  assert not optim.teacher_is_frozen(config)
  config.train.frozen_teacher = '/some/run'
  assert optim.teacher_is_frozen(config)
  assert train.frozen_teacher_network(config) == 'student'


def test_a_network_named_without_a_source_is_an_error(tmp_path):
  config = helpers_eval.tiny_eval_config()
  config.train.frozen_teacher_network = 'teacher'
  with pytest.raises(ckpt.CheckpointError, match='frozen_teacher_network.*frozen_teacher is not'):
    train.train_loop(config, str(tmp_path / 'run'), iter(()), steps_per_epoch=1)
  assert not (tmp_path / 'run').exists()
