"""Checkpoints and resumption: the Orbax manager (latest + best, per-process data state,
restore targets, leftovers of a crash), the workdir-config check, and exact resume of
:tiny training (6 steps straight == 3 steps, stop, resume, 3 steps, bit for bit)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import config_dict

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import parallel
from mstkd_jax import train
from tests import helpers_scale


def small_state():
  params = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)}
  return {'params': params, 'opt': optax.adam(1e-3).init(params),
          'step': jnp.asarray(0, jnp.int32)}


def save_all(manager, state, scores):
  for step in range(1, 7):
    ckpt.save(manager, step, state, {'value': step}, {'step': step},
              val_dice=scores.get(step))
  manager.wait_until_finished()


def test_keeps_latest_and_best(tmp_path):
  state = small_state()
  manager = ckpt.make_manager(tmp_path / 'ckpt', keep=2)
  save_all(manager, state, {2: 0.9, 4: 0.5})
  assert manager.all_steps() == [2, 5, 6]          # the last two and the best
  assert ckpt.resolve_step(manager, 'best') == 2
  assert ckpt.resolve_step(manager, 'latest') == 6
  manager.close()
  reopened = ckpt.make_manager(tmp_path / 'ckpt', read_only=True)   # scores are on disk
  assert ckpt.resolve_step(reopened, 'best') == 2


def test_best_needs_a_score(tmp_path):
  manager = ckpt.make_manager(tmp_path / 'ckpt', keep=2)
  save_all(manager, small_state(), {})
  assert ckpt.best_step(manager) is None
  with pytest.raises(FileNotFoundError, match='validation score'):
    ckpt.resolve_step(manager, 'best')


def test_restore_into_replicated_target_keeps_types(tmp_path):
  state = small_state()
  manager = ckpt.make_manager(tmp_path / 'ckpt')
  ckpt.save(manager, 3, state, {'bytes': 'abc'}, {'best_dice': None})
  manager.wait_until_finished()
  mesh = parallel.make_mesh()
  target = ckpt.abstract_like(state, parallel.replicated(mesh))
  restored, data, meta = ckpt.restore(manager, 3, target)
  assert type(restored['opt'][0]) is type(state['opt'][0])    # ScaleByAdamState, not a dict
  assert restored['params']['w'].sharding == parallel.replicated(mesh)
  np.testing.assert_array_equal(restored['params']['w'], state['params']['w'])
  assert data == {'bytes': 'abc'} and meta == {'best_dice': None}
  files = os.listdir(tmp_path / 'ckpt' / '3' / 'data')
  assert 'process_0-of-1.json' in files


def test_data_iterator_state_round_trip(tmp_path, tiny_config):
  """grain-style bytes state -> JSON in the checkpoint -> the same position."""
  it = train.RandomBatches(tiny_config, 2, seed=5)
  for _ in range(3):
    next(it)
  manager = ckpt.make_manager(tmp_path / 'ckpt')
  ckpt.save(manager, 3, small_state(), train._data_state(it), {})
  manager.wait_until_finished()
  _, data, _ = ckpt.restore(manager, 3, ckpt.abstract_like(small_state()))
  fresh = train.RandomBatches(tiny_config, 2, seed=5)
  assert train._restore_data_state(fresh, data)
  np.testing.assert_array_equal(next(fresh)['image'], it.batch(3)['image'])


def test_grain_loader_state_round_trip(tmp_path, tiny_config):
  """The real input pipeline's iterator resumes at the same batch through a checkpoint."""
  pipeline = pytest.importorskip('mstkd_jax.data.pipeline')
  workdir = str(tmp_path / 'work')
  make = lambda: pipeline.make_train_loader(
      pipeline.prepare(tiny_config, workdir, progress=False), batch_size=1, seed=0,
      worker_count=0)
  it = make()
  first = [next(it)['image'] for _ in range(3)]
  manager = ckpt.make_manager(tmp_path / 'ckpt')
  ckpt.save(manager, 2, small_state(), None, {})   # nothing to save: restores to None
  it2 = make()
  next(it2), next(it2)
  ckpt.save(manager, 3, small_state(), train._data_state(it2), {})
  manager.wait_until_finished()
  it.close(), it2.close()
  _, data, _ = ckpt.restore(manager, 3, ckpt.abstract_like(small_state()))
  assert isinstance(data['bytes'], str)
  resumed = make()
  assert train._restore_data_state(resumed, data)
  np.testing.assert_array_equal(next(resumed)['image'], first[2])
  resumed.close()
  _, nothing, _ = ckpt.restore(manager, 2, ckpt.abstract_like(small_state()))
  assert not train._restore_data_state(make(), nothing)


def test_leftover_of_an_interrupted_save_is_ignored_and_removed(tmp_path):
  manager = ckpt.make_manager(tmp_path / 'ckpt')
  ckpt.save(manager, 2, small_state(), None, {})
  manager.wait_until_finished()
  manager.close()
  partial = tmp_path / 'ckpt' / '4.orbax-checkpoint-tmp'
  (partial / 'state').mkdir(parents=True)
  manager = ckpt.make_manager(tmp_path / 'ckpt')
  assert manager.latest_step() == 2
  ckpt.save(manager, 5, small_state(), None, {})    # the clean-up finishes before a save
  manager.wait_until_finished()
  assert not partial.exists()
  assert manager.all_steps() == [2, 5]


def test_workdir_config_check(tmp_path, tiny_config):
  from ml_collections import config_dict
  workdir = str(tmp_path)
  assert train.check_workdir_config(tiny_config, workdir) == []     # nothing there yet
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(tiny_config.to_json_best_effort())
  assert train.check_workdir_config(tiny_config, workdir) == []
  longer = config_dict.ConfigDict(tiny_config.to_dict())
  longer.train.epochs = 100                  # run length, logging, workers: may change
  longer.train.log_every = 7
  longer.train.shard_state = True
  longer.eval.batch_size = 4
  assert train.check_workdir_config(longer, workdir) == []
  other = config_dict.ConfigDict(tiny_config.to_dict())
  other.train.learning_rate = 3e-4
  other.model.num_layers = 2
  with pytest.raises(ValueError, match=r'model\.num_layers 4 -> 2, train\.learning_rate .*'
                                       r'--allow_config_change'):
    train.check_workdir_config(other, workdir)
  assert train.check_workdir_config(other, workdir, allow_change=True) == [
      'model.num_layers', 'train.learning_rate']


def test_workdir_config_written_before_a_field_existed(tmp_path, tiny_config):
  """A field absent from the saved config.json (an older version wrote it) resumes at its
  default value and refuses any other value."""
  saved = json.loads(tiny_config.to_json_best_effort())
  del saved['loss']['superset_weight']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert train.check_workdir_config(tiny_config, str(tmp_path)) == []
  changed = config_dict.ConfigDict(tiny_config.to_dict())
  changed.loss.superset_weight = 1.0
  with pytest.raises(ValueError, match=r'loss\.superset_weight 0\.0 -> 1\.0'):
    train.check_workdir_config(changed, str(tmp_path))


@pytest.mark.slow
def test_exact_resume_and_nan_stop():
  report, out, log = helpers_scale.scenario_once('resume')
  assert report['same_keys'] and report['leaves'] > 100
  assert report['unequal'] == [], f'differ after resume: {report["unequal"][:10]}'
  assert report['final_step'] == 6
  assert report['served_straight'] == [0, 1, 2, 3, 4, 5]
  assert report['served_split'] == [[0, 1, 2], [3, 4, 5]]       # data order continues
  assert 'resumed from' in log and 'at step 3' in log
  # NaN in batch 2 -> step 3 stops, naming the terms and the checkpoint of step 2.
  message = report['nan_message']
  assert message.startswith('non-finite loss at step 3'), message
  assert 'total' in message and 'dice' in message
  assert 'last good checkpoint is step 2' in message
  steps = sorted(int(s) for s in os.listdir(os.path.join(out, 'nan', 'checkpoints'))
                 if s.isdigit())
  assert steps == [2]
  with open(os.path.join(out, 'nan', 'metrics.jsonl')) as f:
    logged = [json.loads(line)['step'] for line in f]
  assert logged == [1, 2]
