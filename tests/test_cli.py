"""The command lines as a user meets them: one-line errors with exit status 2 that say what to
do, nothing left behind, help listing every flag (subprocesses, as a user runs them)."""

import json
import logging as py_logging
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from mstkd_jax import logging_utils
from mstkd_jax.data import preprocess, synthetic
from mstkd_jax.data.layouts import Problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=300, **env):
  environ = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, **env)
  environ.pop('MSTKD_TRACEBACK', None)
  return subprocess.run([sys.executable, '-m'] + args, capture_output=True, text=True,
                        cwd=ROOT, env=environ, timeout=timeout)


def _one_error_line(proc):
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith('error: ')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


def test_missing_config_file(tmp_path):
  workdir = tmp_path / 'run'
  proc = _run(['mstkd_jax.main', '--config=configs/nope.py', f'--workdir={workdir}'])
  assert proc.returncode == 2
  assert 'configs/nope.py' in _one_error_line(proc)
  assert not workdir.exists()


def test_misspelt_config_field_keeps_the_hint(tmp_path):
  proc = _run(['mstkd_jax.main', '--config=configs/brats.py:tiny',
               '--config.train.epochz=3', f'--workdir={tmp_path / "run"}'])
  assert proc.returncode == 2
  line = _one_error_line(proc)
  assert 'unknown config field train.epochz' in line
  assert line.endswith('did you mean train.epochs?')


def test_missing_data_root_leaves_no_workdir(tmp_path):
  workdir = tmp_path / 'run'
  proc = _run(['mstkd_jax.main', '--config=configs/brats.py:tiny', f'--workdir={workdir}',
               '--config.data.root=/nonexistent/brats'])
  assert proc.returncode == 2
  assert '/nonexistent/brats' in _one_error_line(proc)
  assert not workdir.exists()


def test_a_bad_case_stops_training_with_one_line_naming_the_file(tmp_path):
  """A case whose FLAIR file is not a NIfTI: one line naming the case and file, exit 2, no
  workdir left (the preprocessing meets it before any training)."""
  root = synthetic.generate_dataset(str(tmp_path / 'data'), 4, (40, 40, 32), 'brats2021',
                                    seed=3)
  case = sorted(os.listdir(root))[1]
  with open(os.path.join(root, case, f'{case}_flair.nii.gz'), 'wb') as f:
    f.write(b'not a nifti file')
  workdir = tmp_path / 'run'
  proc = _run(['mstkd_jax.main', '--config=configs/brats.py:tiny', f'--workdir={workdir}',
               f'--config.data.root={root}'])
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _one_error_line(proc)
  assert case in line and f'{case}_flair.nii.gz' in line
  assert line.endswith('(1 of 4 cases unusable; --config.data.on_bad_case=skip leaves them out)')
  assert not workdir.exists()


def test_convert_missing_state_dict_says_so(tmp_path):
  proc = _run(['mstkd_jax.convert_torch', '--state-dict', str(tmp_path / 'missing.pth'),
               '--config=configs/brats.py:tiny', '--out', str(tmp_path / 'out')])
  assert proc.returncode == 2
  line = _one_error_line(proc)
  assert 'no such file' in line and 'pickle' not in line
  assert not (tmp_path / 'out').exists()


def test_convert_help_is_short_and_plain():
  proc = _run(['mstkd_jax.convert_torch', '--help'])
  assert proc.returncode == 0
  head = proc.stdout.split('flags:')[0]
  assert proc.stdout.count('\nflags:') == 1
  assert ':func:' not in head and 'SPEC' not in head and len(head.splitlines()) < 15
  assert '--state_dict' in proc.stdout or '--state-dict' in proc.stdout


@pytest.mark.parametrize('out', ['noext', 'folder'])
def test_predict_refuses_an_output_that_is_not_a_nifti_file(tmp_path, out):
  image = tmp_path / 'flair.nii.gz'
  nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(image))
  target = tmp_path / out
  if out == 'folder':
    target.mkdir()
  proc = _run(['mstkd_jax.predict', '--checkpoint', str(tmp_path), '--flair', str(image),
               '--out', str(target)])
  assert proc.returncode == 2
  assert '--out' in _one_error_line(proc)
  assert sorted(os.listdir(tmp_path)) == sorted(['flair.nii.gz'] + (['folder'] if out ==
                                                                     'folder' else []))


def test_a_header_claiming_a_huge_volume_is_refused_before_reading(tmp_path):
  """4096^3 voxels in the header, a few bytes of data: a clear problem, no MemoryError."""
  header = nib.Nifti1Header()
  header.set_data_shape((4096, 4096, 4096))
  header.set_data_dtype(np.float32)
  path = tmp_path / 'huge.nii'
  with open(path, 'wb') as f:
    header.write_to(f)
    f.write(b'\0' * 64)
  problems = []
  data, img = preprocess._read_nifti(str(path), 'case', problems)  # pylint: disable=protected-access
  assert data is None and img is None
  assert len(problems) == 1 and isinstance(problems[0], Problem)
  assert '4096x4096x4096' in problems[0].message and 'header' in problems[0].message


def test_metrics_of_steps_lost_in_a_crash_are_dropped_on_resume(tmp_path):
  lines = [json.dumps({'step': s, 'total': 1.0 / s}) for s in range(1, 6)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 6, "tot')
  assert logging_utils.drop_records_after(str(tmp_path), 3) == 3
  kept = [json.loads(line)['step'] for line in (tmp_path / 'metrics.jsonl').read_text()
          .splitlines()]
  assert kept == [1, 2, 3]
  assert logging_utils.drop_records_after(str(tmp_path), 3) == 0


def test_library_info_lines_are_hidden_but_their_warnings_pass():
  handler_filter = logging_utils._LibraryInfoFilter(('orbax', 'jax'))  # pylint: disable=protected-access

  def record(path, level):
    return py_logging.LogRecord('x', level, path, 1, 'message', None, None)

  assert not handler_filter.filter(record('/site-packages/orbax/checkpoint/x.py', py_logging.INFO))
  assert not handler_filter.filter(record('/site-packages/jax/_src/xla_bridge.py',
                                          py_logging.INFO))
  assert handler_filter.filter(record('/site-packages/orbax/checkpoint/x.py',
                                      py_logging.WARNING))
  assert handler_filter.filter(record('/home/me/src/mstkd_jax/train.py', py_logging.INFO))


def test_every_console_script_resolves_and_every_command_has_help():
  """pyproject.toml's commands point at functions that exist; each command's --help exits 0
  and shows no Sphinx markup."""
  import importlib
  import tomllib
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  assert {'mstkd-train', 'mstkd-predict', 'mstkd-evaluate', 'mstkd-convert'} <= set(scripts)
  for target in scripts.values():
    module, _, function = target.partition(':')
    assert callable(getattr(importlib.import_module(module), function)), target
  for module in ('mstkd_jax.predict', 'mstkd_jax.visualize', 'mstkd_jax.report',
                 'mstkd_jax.evaluate_folder'):
    proc = _run([module, '--help'], timeout=120)
    assert proc.returncode == 0, (module, proc.stderr[-2000:])
    assert '``' not in proc.stdout and ':class:' not in proc.stdout, module
    assert 'flags:' in proc.stdout, module


@pytest.mark.parametrize('args, expected', [
    (['--work_dir=/tmp/x'], 'error: unknown flag --work_dir; did you mean --workdir?'),
    (['--config.train.epochs=abc'],
     'error: --config.train.epochs=abc: train.epochs takes an integer (default 2)'),
    (['--config.trian.epochs=3'],
     'error: unknown config field trian (--config.trian.epochs); did you mean train?'),
    (['--config.data.input_shape=abc'],
     'error: --config.data.input_shape: data.input_shape takes a tuple of int, e.g. '
     '--config.data.input_shape=32,32,32'),
    (['--max_steps=x'], 'error: --max_steps=x: expected an integer'),
])
def test_flag_and_field_errors_say_what_is_expected(tmp_path, args, expected):
  workdir = tmp_path / 'run'
  proc = _run(['mstkd_jax.main', '--config=brats:tiny', f'--workdir={workdir}'] + args)
  assert proc.returncode == 2
  assert _one_error_line(proc).startswith(expected)
  assert not workdir.exists()


def test_an_unknown_config_name_lists_the_packaged_ones(tmp_path):
  proc = _run(['mstkd_jax.main', '--config=brat', f'--workdir={tmp_path / "run"}'])
  assert proc.returncode == 2
  line = _one_error_line(proc)
  assert 'cannot load brat' in line and 'brats, fets, cpu_real, demo' in line


def _console(module, *args):
  """``module.console_main()`` the way an installed console script calls it (its
  ``__main__`` is not the module that defines the flags)."""
  code = f'import sys; sys.argv[0] = "console"; from {module} import console_main; console_main()'
  environ = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-c', code] + list(args), capture_output=True,
                        text=True, cwd=ROOT, env=environ, timeout=120)


@pytest.mark.parametrize('module, some_flags', [
    ('mstkd_jax.main', ['config', 'workdir', 'mode', 'checkpoint', 'allow_config_change']),
    ('mstkd_jax.data.prepare', ['config', 'workdir']),
    ('mstkd_jax.convert_torch', ['config', 'state_dict', 'out', 'which', 'allow_pickle']),
    ('mstkd_jax.predict', ['checkpoint', 'out', 'input_dir']),
    ('mstkd_jax.evaluate_folder', ['pred', 'ref', 'missing']),
    ('mstkd_jax.visualize', ['checkpoint', 'case']),
    ('mstkd_jax.report', ['markdown', 'convention']),
])
def test_help_of_a_console_script_lists_its_own_flags(module, some_flags):
  proc = _console(module, '--help')
  assert proc.returncode == 0, proc.stderr[-2000:]
  usage, _, listing = proc.stdout.partition('\nflags:\n')
  assert usage.strip() and listing.strip(), proc.stdout
  for flag in some_flags:
    assert re.search(rf'--(\[no\])?{flag}:', listing), (module, flag, listing)
  assert '--verbosity' not in listing and '--helpfull' not in listing   # absl's own


def test_a_workdir_of_another_config_shows_old_and_new_values(tmp_path, tiny_config):
  from mstkd_jax import train
  (tmp_path / 'config.json').write_text(tiny_config.to_json_best_effort())
  changed = tiny_config.copy_and_resolve_references()
  changed.model.init_channels = 8
  changed.data.input_shape = (48, 48, 48)
  with pytest.raises(ValueError) as info:
    train.check_workdir_config(changed, str(tmp_path))
  message = str(info.value)
  assert 'model.init_channels 4 -> 8' in message
  assert 'data.input_shape [32, 32, 32] -> [48, 48, 48]' in message


def test_predict_creates_the_folder_of_a_single_output_file(tmp_path):
  from mstkd_jax import predict
  from mstkd_jax.predict import outputs
  out = tmp_path / 'a' / 'new' / 'folder' / 'seg.nii.gz'
  outputs.check_out(str(out))
  assert out.parent.is_dir() and not out.exists()
  (tmp_path / 'file').write_text('')
  with pytest.raises(predict.PredictionError, match='cannot create the folder'):
    outputs.check_out(str(tmp_path / 'file' / 'seg.nii.gz'))


def test_reading_a_checkpoint_logs_no_read_only_warning(tmp_path, caplog):
  from mstkd_jax import checkpoint as ckpt
  (tmp_path / 'checkpoints').mkdir()
  with caplog.at_level(py_logging.WARNING):
    ckpt.make_manager(str(tmp_path / 'checkpoints'), read_only=True).close()
  assert not [r for r in caplog.records if 'read only' in r.getMessage()]
  # The filter is gone afterwards: other warnings of Orbax still pass.
  assert not py_logging.getLogger('absl').filters


_BAR_AND_LOG = r'''
import sys
from absl import flags, logging
from mstkd_jax.logging_utils import Progress
if sys.argv[1] == 'absl':         # what absl's app.run does
  flags.FLAGS(sys.argv[:1])
  logging.use_absl_handler()
logging.set_verbosity(logging.INFO)
bar = Progress(4, 'work', log_lines=False)
bar.update(1)
logging.info('MESSAGE-IN-THE-MIDDLE')
bar.update(3)
bar.close()
'''


@pytest.mark.parametrize('handler', ['python', 'absl'])
def test_log_lines_are_written_above_a_progress_bar(handler):
  """On a terminal (a pseudo-terminal here) a log line never continues the bar's line."""
  import fcntl
  import pty
  import struct
  import termios
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))
  proc = subprocess.Popen([sys.executable, '-c', _BAR_AND_LOG, handler], stdin=slave,
                          stdout=slave, stderr=slave, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
  os.close(slave)
  out = b''
  while True:
    try:
      chunk = os.read(master, 4096)
    except OSError:   # the child closed the terminal
      break
    if not chunk:
      break
    out += chunk
  os.close(master)
  assert proc.wait(timeout=60) == 0
  text = out.decode(errors='replace')
  assert '%|' in text, text                       # the bar was drawn
  line = re.split(r'[\r\n]', text.split('MESSAGE-IN-THE-MIDDLE')[0])[-1]
  assert '%|' not in line and '/4' not in line, text


def test_data_check_writes_no_carriage_returns_into_a_log(tmp_path):
  root = synthetic.generate_dataset(str(tmp_path / 'data'), 2, (24, 24, 16), 'brats2021',
                                    seed=1, progress=False)
  proc = _run(['mstkd_jax.data.check', '--root', root])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '2 cases' in proc.stdout
  assert '\r' not in proc.stderr + proc.stdout


def test_evaluate_folder_names_missing_skip_and_counts_what_it_leaves_out(tmp_path):
  seg = np.zeros((16, 16, 16), np.uint8)
  seg[4:10, 4:10, 4:10] = 2
  (tmp_path / 'ref').mkdir()
  (tmp_path / 'pred').mkdir()
  for name in ('ref/A', 'ref/B', 'ref/C', 'pred/A'):
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(tmp_path / f'{name}.nii.gz'))
  args = ['mstkd_jax.evaluate_folder', '--pred', str(tmp_path / 'pred'), '--ref',
          str(tmp_path / 'ref'), '--out', str(tmp_path / 'out')]
  proc = _run(args)
  assert proc.returncode == 2
  line = _one_error_line(proc)
  assert 'no prediction for 2 of 3' in line and '--missing=skip' in line
  proc = _run(args + ['--missing=skip'])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '1 cases (2 reference case(s) without a prediction left out)' in proc.stdout
  with open(tmp_path / 'out' / 'summary.json') as f:
    assert json.load(f)['references_left_out'] == ['B', 'C']


def test_a_command_says_which_type_a_flag_takes_and_which_flag_was_meant(capsys):
  from absl import flags
  from mstkd_jax import cli
  command = cli.Command('prog', 'usage')
  flags.DEFINE_float('threshold', 0.5, 'Probability threshold.', flag_values=command.flags)
  for argv, expected in ((['--threshold=abc'], 'error: --threshold=abc: expected a number'),
                         (['--treshold=0.3'],
                          'error: unknown flag --treshold; did you mean --threshold?')):
    with pytest.raises(SystemExit) as info:
      command.parse(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith(expected)
