"""Faults met by the commands, each ending in one clean line: a config.json that is not JSON,
a checkpoint of another config, SIGTERM during an export, a full disk during training; and
the README saying where ``python -m`` commands run."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import cli, disk, export, main
from mstkd_jax.configs import demo
from tests import helpers_scale

ROOT = helpers_scale.ROOT


def _command(args, module='mstkd_jax.main', timeout=300, code=None):
  env = helpers_scale.helper_env(1)
  env.pop('MSTKD_TRACEBACK', None)
  head = ['-c', code] if code else ['-m', module]
  return subprocess.run([sys.executable] + head + list(args), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _one_error(proc, status):
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert proc.returncode == status, proc.stderr[-3000:]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and 'Event loop' not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_config, tiny_state):
  """A workdir holding a checkpoint of the :tiny config at step 2 (and its config.json)."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  manager = ckpt.make_manager(os.path.join(workdir, 'checkpoints'))
  ckpt.save(manager, 2, tiny_state, None, {'step': 2, 'epoch': 0, 'best_dice': None})
  manager.wait_until_finished()
  manager.close()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(tiny_config.to_json_best_effort(indent=2))
  return workdir


def _copy(workdir, tmp_path):
  copy = str(tmp_path / 'work')
  shutil.copytree(workdir, copy)
  return copy


# ---- a config.json that is not JSON ----

def test_a_config_json_that_is_not_json_is_one_line_naming_file_and_position(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, 'config.json')
  with open(path, 'w') as f:
    f.write('{\n  "model": {\n    "embed_dim": 32,,\n')
  expected = f'error: {path} is not valid JSON: Expecting property name enclosed in double ' \
             'quotes at line 3, column 21'
  runs = {'train': ['--config=brats:tiny', f'--workdir={workdir}'],
          'eval': ['--mode=eval', f'--workdir={workdir}'],
          'export': ['--mode=export', f'--workdir={workdir}', f'--out={tmp_path / "x"}']}
  for mode, args in runs.items():
    line = _one_error(_command(args), 2)
    assert line.startswith(expected), (mode, line)
  assert not (tmp_path / 'x').exists()
  # Prediction reads it through checkpoint.load_config as well.
  image = tmp_path / 'flair.nii.gz'
  nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), str(image))
  proc = _command(['--checkpoint', workdir, '--t2f', str(image), '--out',
                   str(tmp_path / 'seg.nii.gz')], module='mstkd_jax.predict')
  assert proc.returncode == 2 and f'{path} is not valid JSON' in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


# ---- a checkpoint of another config ----

def test_eval_on_a_checkpoint_of_another_config_is_one_clean_line(trained, tmp_path):
  """The workdir's config.json says another network than its checkpoint holds: refused from
  the checkpoint's metadata before Orbax reads an array (a restore failing half-way leaves
  TensorStore callbacks on a closed event loop, printed as tracebacks at exit)."""
  workdir = _copy(trained, tmp_path)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(demo.get_config().to_json_best_effort(indent=2))
  line = _one_error(_command(['--mode=eval', f'--workdir={workdir}']), 2)
  assert f'checkpoint {workdir}/checkpoints/2 holds networks of another config' in line
  assert 'entries of another shape' in line and 'stored (' in line


# ---- SIGTERM during an export ----

_PAUSED_EXPORT = '''
import os, sys, time
from mstkd_jax import main, model_facts
original = model_facts.write_into_export
def paused(out, *args, **kwargs):
  open(os.environ['MARKER'], 'w').close()
  time.sleep(300)
  return original(out, *args, **kwargs)
model_facts.write_into_export = paused
sys.argv = ['mstkd_jax.main'] + sys.argv[1:]
main.console_main()
'''


@pytest.mark.slow
def test_sigterm_during_an_export_says_it_is_incomplete_and_a_rerun_completes_it(trained,
                                                                                  tmp_path):
  out = str(tmp_path / 'student')
  marker = str(tmp_path / 'paused')
  env = helpers_scale.helper_env(1, MARKER=marker)
  env.pop('MSTKD_TRACEBACK', None)
  args = ['--mode=export', f'--workdir={trained}', f'--out={out}']
  proc = subprocess.Popen([sys.executable, '-c', _PAUSED_EXPORT] + args, cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    helpers_scale.wait_for(lambda: os.path.exists(marker), proc, 300, 'the paused export')
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()
  proc.stderr = stderr
  line = _one_error(proc, 128 + signal.SIGTERM)
  assert line == (f'error: stopped by SIGTERM during the export: {out} holds no complete '
                  'export; re-run the same command to complete it')
  assert os.path.isdir(os.path.join(out, 'variables')) and not export.is_complete(out)
  assert not os.path.exists(os.path.join(out, '.mstkd.lock'))
  again = _command(args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert export.is_complete(out)


def test_an_interruption_after_the_export_says_it_is_complete(tmp_path):
  out = str(tmp_path / 'student')
  os.makedirs(out)
  with open(os.path.join(out, ckpt.EXPORT_MANIFEST), 'w') as f:
    json.dump({'kind': 'network', 'step': 2}, f)
  message = main.interrupted_message(cli.Interrupted(signal.SIGTERM), 'export', out, 0)
  assert message == f'stopped by SIGTERM after the export completed: {out} is complete'


# ---- a full disk ----

def test_full_disk_errors_are_recognised():
  assert disk.is_full(OSError(errno.ENOSPC, 'No space left on device'))
  assert disk.is_full(OSError(errno.EDQUOT, 'Disk quota exceeded'))
  assert disk.is_full(ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": Failed to '
                                 "write 10 bytes: No space left on device [os_error_code='28']"))
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = OSError(errno.ENOSPC, 'No space left on device')
  assert disk.is_full(wrapped)
  assert not disk.is_full(OSError(errno.EACCES, 'Permission denied'))
  assert not disk.is_full(ValueError('shapes differ'))


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path],
                          capture_output=True, text=True, check=False)
  if result.returncode:
    pytest.skip(f'cannot mount a small tmpfs here (needs root): {result.stderr.strip()}')


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line_then_the_rerun_resumes(tmp_path):
  """A 20 MB filesystem holds the data and one checkpoint of :tiny (17 MB), not two: exit 4
  with one line (what, free space, the last good checkpoint), no Orbax tracebacks, no
  temporary folder; after the filesystem grows, the same command resumes from step 1."""
  mount = str(tmp_path / 'small')
  _mount_tmpfs(mount, '20m')
  try:
    workdir = os.path.join(mount, 'work')
    args = ['--config=brats:tiny', f'--workdir={workdir}', '--config.train.checkpoint_every=1',
            '--max_steps=3', '--config.data.split=(0.8,0.0,0.2)']
    line = _one_error(_command(args, timeout=600), 4)
    checkpoints = os.path.join(workdir, 'checkpoints')
    assert re.search(rf'saving the checkpoint of step 2 into {checkpoints} failed \(.*; '
                     rf'[0-9.]+ MB free on the filesystem of {checkpoints}\); the last good '
                     rf'checkpoint is step 1 in {checkpoints}\.', line), line
    assert sorted(os.listdir(checkpoints)) == ['1']          # no temporary folder
    assert not os.path.exists(os.path.join(workdir, '.mstkd.lock'))
    subprocess.run(['mount', '-o', 'remount,size=100m', mount], check=True)
    proc = _command(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'resumed from {checkpoints} at step 1' in proc.stderr
    assert sorted(os.listdir(checkpoints)) == ['1', '2', '3']
  finally:
    for _ in range(10):
      if not subprocess.run(['umount', mount], capture_output=True, check=False).returncode:
        break
      time.sleep(1)


# ---- where the python -m commands run ----

def test_the_readme_says_python_m_commands_run_from_the_checkout():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  quick_start = text[text.index('## Quick start'):text.index('## Installing the package')]
  assert 'run from the checkout' in quick_start, 'the Quick start must say where to run them'
  training = text[text.index('## Training on BraTS'):text.index('## Evaluation, prediction')]
  assert 'from the checkout' in training.lower()


def test_a_full_disk_outside_a_checkpoint_save_names_the_file_and_the_last_checkpoint(tmp_path):
  workdir = tmp_path / 'work'
  (workdir / 'checkpoints' / '3').mkdir(parents=True)
  target = str(workdir / 'metrics.jsonl')
  message = main.full_disk_message(OSError(errno.ENOSPC, 'No space left on device', target),
                                    'train', str(workdir))
  assert message.startswith(f'could not write {target}: No space left on device (')
  assert 'MB free on the filesystem of' in message
  assert f'the last good checkpoint is step 3 in {workdir}/checkpoints' in message


def test_free_space_is_checked_only_where_the_filesystem_says(tmp_path, monkeypatch):
  assert disk.enough_for(str(tmp_path), 1) is None
  assert disk.enough_for(str(tmp_path), 1 << 62) is not None
  assert disk.space(str(tmp_path / 'not' / 'yet')).endswith(f'free on the filesystem of '
                                                            f'{tmp_path}/not/yet')

  class Unknown:                      # a mount that reports no size (some FUSE filesystems)
    f_blocks = f_bavail = f_frsize = 0
  monkeypatch.setattr(os, 'statvfs', lambda path: Unknown())
  assert disk.enough_for(str(tmp_path), 1 << 62) is None
  assert disk.space(str(tmp_path)) == f'free space of {tmp_path} unknown'


_BACKGROUND = r'''
import errno, logging, threading
from mstkd_jax import disk
disk.quiet_background_errors()
def fail(error):
  raise error
for error in (OSError(errno.ENOSPC, 'No space left on device'),
              RuntimeError('Event loop is closed'), ValueError('a real bug')):
  thread = threading.Thread(target=fail, args=(error,))
  thread.start()
  thread.join()
try:
  raise OSError(errno.ENOSPC, 'No space left on device')
except OSError:
  logging.getLogger('asyncio').error('Task exception was never retrieved', exc_info=True)
'''


def test_reports_of_failing_background_writers_are_kept_off_the_terminal():
  proc = _command([], code=_BACKGROUND)
  assert proc.returncode == 0, proc.stderr
  assert 'ValueError: a real bug' in proc.stderr                  # other errors pass
  assert 'No space left' not in proc.stderr and 'Event loop' not in proc.stderr, proc.stderr
  assert proc.stderr.count('Traceback') == 1, proc.stderr
