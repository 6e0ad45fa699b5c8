"""Exporting the student: contents, size, identical outputs, and use by evaluation."""

import json
import os

import numpy as np
import pytest

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import evaluate
from mstkd_jax import inference as inference_lib
from mstkd_jax import export
from mstkd_jax.models import build
from tests import helpers_eval


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  return helpers_eval.trained_run(tmp_path_factory)


def test_export_contents_and_size(run, exported):
  assert sorted(os.listdir(exported)) == ['config.json', 'evaluation.json', 'manifest.json',
                                          'metadata.json', 'prediction_policy.json',
                                          'preprocessing.json', 'teacher_variables',
                                          'variables']
  with open(os.path.join(exported, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['network'] == 'student' and manifest['step'] == 2
  with open(os.path.join(exported, 'preprocessing.json')) as f:
    prep = json.load(f)
  assert prep['input_shape'] == list(run.config.data.input_shape)
  assert prep['normalization'] == run.config.data.normalization
  assert prep['channels'] == ['FLAIR', 'T1', 'T1Gd', 'T2']
  assert json.loads(json.dumps(ckpt.load_config(exported).model.to_dict())) == \
      json.loads(json.dumps(run.config.model.to_dict()))
  size = export.folder_bytes(exported)
  train_size = export.folder_bytes(os.path.join(run.workdir, 'checkpoints', '2'))
  # teacher + student + discriminator + two Adam states against the two networks alone
  assert size < 0.4 * train_size, (size, train_size)
  assert export.folder_bytes(os.path.join(exported, 'variables')) < 0.2 * train_size


def test_exported_student_gives_the_same_probabilities(run, exported):
  from_export = ckpt.load_networks(run.config, exported).primary()
  from_workdir = ckpt.load_networks(run.config, run.workdir, 'latest').networks['student']
  inference = inference_lib.get_inference(run.config)
  rs = np.random.RandomState(1)
  images = rs.rand(3, *run.config.data.input_shape, 4).astype(np.float32)
  images[1, ..., 1:3] = 0.0   # a missing-modality input too
  a = inference.run(inference.place(from_export), images)
  b = inference.run(inference.place(from_workdir), images)
  c = inference.run(inference.place(build.network_variables(run.state, 'student')), images)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)


def test_evaluation_accepts_the_export(run, exported, tmp_path):
  summary = evaluate.evaluate_checkpoint(run.config, run.workdir, exported, split='test',
                                         out=str(tmp_path))
  assert summary['source'].startswith('export ')
  with open(os.path.join(run.workdir, 'eval', 'summary.json')) as f:
    reference = json.load(f)
  for region in ('WT', 'TC', 'ET'):
    for metric in ('dice', 'hd95'):
      assert summary['average_over_subsets'][region][metric] == pytest.approx(
          reference['average_over_subsets'][region][metric])
      # The export carries the teacher: its row on all four scans is the workdir's.
      assert summary['teacher'][region][metric] == pytest.approx(
          reference['teacher'][region][metric])


def test_export_refuses_another_config(run, exported):
  other = helpers_eval.tiny_eval_config()
  other.model.init_channels = 8
  other.data.input_shape = (48, 48, 48)
  with pytest.raises(ValueError, match='trained with another config') as info:
    evaluate.evaluate_checkpoint(other, run.workdir, exported)
  assert 'model.init_channels: config 8, checkpoint 4' in str(info.value)
  assert 'data.input_shape' in str(info.value)


def test_export_refuses_to_replace_an_export_without_overwrite(run, exported):
  with pytest.raises(FileExistsError, match='--overwrite'):
    export.export_student(run.config, run.workdir, None, exported)
  with open(os.path.join(exported, 'metadata.json')) as f:
    metadata = json.load(f)
  assert metadata['inputs']['channels'] == ['FLAIR', 'T1', 'T1Gd', 'T2']
  assert metadata['training']['step'] == 2 and 'license' in metadata
  assert 'research' in metadata['intended_use']
  again = export.export_student(run.config, run.workdir, None, exported, overwrite=True)
  assert again == exported


def test_a_finished_run_is_not_trained_or_compiled_again(run, monkeypatch):
  """Re-running a finished training: the state is restored, nothing is compiled."""
  from mstkd_jax import train

  def no_compile(*args, **kwargs):
    raise AssertionError('the training step was compiled for a finished run')

  monkeypatch.setattr(train, 'compile_train_step', no_compile)
  batches = (b for b in train.random_batches(run.config, 1))   # no iterator state
  state = train.train_loop(run.config, run.workdir, batches, steps_per_epoch=1, max_steps=2)
  assert int(state.step) == 2
