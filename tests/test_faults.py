"""Preemption and crashes of a real training process (:tiny, one CPU device).

One run is stopped by SIGTERM (it finishes the step, saves, exits 143), resumed and killed
with SIGKILL while Orbax is committing a checkpoint, and resumed again from the last complete
checkpoint to the end: the final state equals 6 uninterrupted steps bit for bit.
"""

import json
import os
import re
import signal
import subprocess

import numpy as np
import pytest

from tests import helpers_scale

TRAIN = ['train', '--steps', '6', '--checkpoint-every', '2', '--epochs', '10']


def complete_steps(workdir):
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


@pytest.mark.slow
def test_sigterm_then_kill9_mid_save_then_exact_resume(tmp_path):
  workdir = str(tmp_path / 'run')
  args = TRAIN + ['--workdir', workdir]

  # 1. SIGTERM once step 3 is logged: the step in flight finishes, a checkpoint is saved.
  log1 = str(tmp_path / 'run1.log')
  proc = helpers_scale.start_helper(args, log_path=log1)
  try:
    helpers_scale.wait_for(lambda: max(helpers_scale.metrics_steps(workdir), default=0) >= 3,
                           proc, 300, 'step 3')
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
  finally:
    proc.kill()
  text = open(log1).read()
  assert code == 128 + signal.SIGTERM, text[-3000:]
  stopped = max(helpers_scale.metrics_steps(workdir))
  assert f'stopped by signal 15 (SIGTERM) after step {stopped}' in text
  assert 'Re-run the same command to resume' in text
  assert complete_steps(workdir)[-1] == stopped

  # 2. Resume; hang Orbax just before it commits step 6; kill -9 there.
  log2 = str(tmp_path / 'run2.log')
  proc = helpers_scale.start_helper(args + ['--hang-save-at', '6'], log_path=log2)
  marker = os.path.join(workdir, 'HANGING_6')
  try:
    helpers_scale.wait_for(lambda: os.path.exists(marker), proc, 300, 'the save of step 6')
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    proc.kill()
  assert f'resumed from {os.path.join(workdir, "checkpoints")} at step {stopped}' in \
      open(log2).read()
  leftovers = [n for n in os.listdir(os.path.join(workdir, 'checkpoints'))
               if n.startswith('6.')]
  assert leftovers, 'the interrupted save should have left its temporary folder'
  assert complete_steps(workdir)[-1] == 4

  # 3. The same command again: resumes from step 4 and ends where 6 straight steps end.
  dump = str(tmp_path / 'final.npz')
  code, text = helpers_scale.run_helper(args + ['--dump', dump], timeout=300,
                                        log_path=str(tmp_path / 'run3.log'))
  assert code == 0, text[-3000:]
  assert 'at step 4' in text
  with open(dump + '.json') as f:
    assert json.load(f)['served'] == [4, 5]
  assert complete_steps(workdir)[-1] == 6
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n]

  # Logs: one JSON line per step with every loss term and the rates; TensorBoard events.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records][-2:] == [5, 6]
  for key in ('total', 'dice', 'mstkd', 'logit', 'gsme', 'disc', 'learning_rate',
              'steps_per_s', 'volumes_per_s', 'eta_s'):
    assert key in records[-1], key
  events = os.listdir(os.path.join(workdir, 'tensorboard'))
  assert any(name.startswith('events.out.tfevents') for name in events), events
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['embed_dim'] == 32

  _, out, _ = helpers_scale.scenario_once('resume')
  straight = np.load(os.path.join(out, 'straight.npz'))
  final = np.load(dump)
  assert sorted(final.files) == sorted(straight.files)
  unequal = [k for k in straight.files if not np.array_equal(final[k], straight[k])]
  assert not unequal, unequal[:10]


def test_main_refuses_a_workdir_of_another_config(tmp_path):
  """The command line refuses to resume with another config, and says how to proceed."""
  workdir = tmp_path / 'work'
  (workdir / 'checkpoints' / '2').mkdir(parents=True)   # something to resume
  (workdir / 'config.json').write_text(json.dumps({'train': {'learning_rate': 1.0}}))
  env = helpers_scale.helper_env(1)
  proc = subprocess.run(
      [os.sys.executable, '-m', 'mstkd_jax.main', '--config=configs/brats.py:tiny',
       f'--workdir={workdir}'],
      cwd=helpers_scale.ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'holds a different config' in proc.stderr
  assert '--allow_config_change' in proc.stderr


_FAILING_SAVE = '''
import errno, sys
from mstkd_jax import checkpoint, main
original = checkpoint.save
def save(manager, step, *args, **kwargs):
  if step >= 2:
    raise OSError(errno.ENOSPC, 'No space left on device')
  return original(manager, step, *args, **kwargs)
checkpoint.save = save
sys.argv = ['mstkd_jax.main'] + sys.argv[1:]
main.console_main()
'''


@pytest.mark.slow
def test_a_failed_checkpoint_save_names_the_last_good_one(tmp_path):
  """A save that fails (here: disk full from step 2 on) ends the command with one line that
  names the failed step and the last good checkpoint, exit status 4, no traceback."""
  workdir = tmp_path / 'work'
  proc = subprocess.run(
      [os.sys.executable, '-c', _FAILING_SAVE, '--config=configs/brats.py:tiny',
       f'--workdir={workdir}', '--config.train.checkpoint_every=1', '--max_steps=3'],
      cwd=helpers_scale.ROOT, env=helpers_scale.helper_env(1), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 4, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert 'saving the checkpoint of step 2' in errors[0]
  assert 'No space left on device' in errors[0]
  assert 'the last good checkpoint is step 1' in errors[0]
  assert (workdir / 'checkpoints' / '1').is_dir()


@pytest.mark.slow
def test_a_training_log_as_a_user_reads_it(tmp_path):
  """A fresh tiny training through the command line: no Orbax INFO lines or false read-only
  warnings, what is happening said before each long stretch, losses named as losses and
  validation Dice as Dice; running the same command again trains and compiles nothing."""
  workdir = tmp_path / 'work'
  command = [os.sys.executable, '-m', 'mstkd_jax.main', '--config=configs/brats.py:tiny',
             f'--workdir={workdir}', '--config.train.epochs=1',
             '--config.train.eval_every_epochs=1', '--config.eval.val_subsets=full']
  env = helpers_scale.helper_env(1)
  env.pop('MSTKD_TRACEBACK', None)
  proc = subprocess.run(command, cwd=helpers_scale.ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  log = proc.stderr + proc.stdout
  assert proc.returncode == 0, log[-3000:]
  assert 'read_only=True' not in log and 'Given directory is read only' not in log
  assert 'orbax' not in log.lower().replace('orbax checkpoint', ''), [
      line for line in log.splitlines() if 'orbax' in line.lower()][:5]
  assert "Unable to initialize backend 'tpu'" not in log
  assert 'building the networks' in log and 'the training step (teacher' in log
  step_lines = [line for line in log.splitlines() if '] step ' in line]
  assert step_lines and all(' loss ' in line and 'dice_loss' in line for line in step_lines
                            if 'val Dice' not in line), step_lines[:3]
  assert not any(re.search(r'[:,] dice \d', line) for line in step_lines), step_lines[:3]
  assert any('val Dice (student)' in line for line in step_lines), step_lines
  again = subprocess.run(command, cwd=helpers_scale.ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'training already finished' in again.stderr
  assert 'the training step (teacher' not in again.stderr
