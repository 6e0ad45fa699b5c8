"""One job per folder (mstkd_jax/workdir_lock.py, and the commands that take the lock): the
second job fails at once naming the first; a lock whose holder is gone is taken over."""

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from mstkd_jax import workdir_lock
from tests import helpers_scale


def _write_lock(folder, **fields):
  """A lock file as another job would have left it."""
  record = {'host': socket.gethostname(), 'pid': os.getpid(), 'pid_start': None,
            'boot_id': None, 'started': '2026-01-01T00:00:00+00:00', 'purpose': 'training',
            'command': 'x', 'token': 'other'}
  record.update(fields)
  os.makedirs(folder, exist_ok=True)
  with open(workdir_lock.lock_path(folder), 'w') as f:
    json.dump(record, f)
  return record


def _dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def test_held_then_released(tmp_path):
  folder = str(tmp_path / 'work')
  with workdir_lock.hold(folder, 'training') as lock:
    holder = workdir_lock.read_holder(folder)
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    assert holder['purpose'] == 'training' and holder['started']
    assert lock.path == os.path.join(folder, '.mstkd.lock')
    with pytest.raises(workdir_lock.FolderBusy) as busy:
      workdir_lock.hold(folder, 'evaluation').acquire()
    message = str(busy.value)
    assert f'pid {os.getpid()} on {socket.gethostname()}' in message
    assert holder['started'] in message and 'training' in message and lock.path in message
  assert workdir_lock.read_holder(folder) is None
  assert os.listdir(folder) == []                       # no temporary file left either


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
  folder = str(tmp_path / 'work')
  _write_lock(folder, pid=_dead_pid())
  with workdir_lock.hold(folder, 'evaluation'):
    assert workdir_lock.read_holder(folder)['pid'] == os.getpid()


def test_a_reused_pid_or_a_reboot_does_not_hold_the_lock(tmp_path):
  folder = str(tmp_path / 'work')
  start = workdir_lock._start_ticks(os.getpid())   # pylint: disable=protected-access
  if start is None:
    pytest.skip('no /proc on this system: process start times are unknown')
  _write_lock(folder, pid=os.getpid(), pid_start=start + 1)
  with workdir_lock.hold(folder, 'training'):
    pass
  boot = workdir_lock._boot_id()                   # pylint: disable=protected-access
  if boot:
    _write_lock(folder, pid=os.getppid(), boot_id='another-boot')
    with workdir_lock.hold(folder, 'training'):
      pass


def test_a_live_process_on_this_host_holds_it(tmp_path):
  folder = str(tmp_path / 'work')
  parent_start = workdir_lock._start_ticks(os.getppid())   # pylint: disable=protected-access
  _write_lock(folder, pid=os.getppid(), pid_start=parent_start)
  with pytest.raises(workdir_lock.FolderBusy, match=f'pid {os.getppid()}'):
    workdir_lock.hold(folder, 'training').acquire()


def test_another_host_holds_it_until_its_heartbeat_stops(tmp_path):
  folder = str(tmp_path / 'work')
  _write_lock(folder, host='node-elsewhere', pid=1)
  with pytest.raises(workdir_lock.FolderBusy, match='node-elsewhere.*last heartbeat'):
    workdir_lock.hold(folder, 'training').acquire()
  old = time.time() - workdir_lock.STALE_AFTER_S - 5
  os.utime(workdir_lock.lock_path(folder), (old, old))
  with workdir_lock.hold(folder, 'training'):
    assert workdir_lock.read_holder(folder)['host'] == socket.gethostname()


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_S', 0.05)
  folder = str(tmp_path / 'work')
  with workdir_lock.hold(folder, 'training') as lock:
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.5)
    assert time.time() - os.stat(lock.path).st_mtime < 100


def test_one_of_many_takes_over_a_stale_lock(tmp_path):
  """Eight takers find the same stale lock at once: exactly one gets the folder."""
  folder = str(tmp_path / 'work')
  _write_lock(folder, pid=_dead_pid())
  barrier = threading.Barrier(8)
  won, busy = [], []

  def take():
    lock = workdir_lock.hold(folder, 'training')
    barrier.wait()
    try:
      lock.acquire()
      won.append(lock)
    except workdir_lock.FolderBusy:
      busy.append(lock)

  threads = [threading.Thread(target=take) for _ in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert len(won) == 1 and len(busy) == 7
  assert workdir_lock.read_holder(folder)['token'] == won[0].record['token']
  won[0].release()
  assert sorted(os.listdir(folder)) == []


def test_an_unreadable_lock_is_busy_until_it_is_old(tmp_path):
  folder = str(tmp_path / 'work')
  os.makedirs(folder)
  with open(workdir_lock.lock_path(folder), 'w') as f:
    f.write('{"host": ')                               # a lock file being written
  with pytest.raises(workdir_lock.FolderBusy, match='cannot be read'):
    workdir_lock.hold(folder, 'training').acquire()
  old = time.time() - workdir_lock.STALE_AFTER_S - 5
  os.utime(workdir_lock.lock_path(folder), (old, old))
  with workdir_lock.hold(folder, 'training'):
    pass


def test_only_process_0_of_a_job_takes_the_lock(tmp_path, monkeypatch):
  """The processes of one job share process 0's lock: the others create no lock file and
  learn from the collective whether process 0 got it."""
  from mstkd_jax import main, parallel   # pylint: disable=import-outside-toplevel
  folder = str(tmp_path / 'work')
  monkeypatch.setattr(parallel, 'is_main_process', lambda: False)
  monkeypatch.setattr(parallel, 'any_process', lambda flag: flag)
  with main.job_lock(folder, 'training'):
    assert not os.path.exists(workdir_lock.lock_path(folder))
  monkeypatch.setattr(parallel, 'any_process', lambda flag: True)   # process 0 failed
  _write_lock(folder, pid=os.getppid())
  with pytest.raises(workdir_lock.FolderBusy, match=f'pid {os.getppid()}'):
    with main.job_lock(folder, 'training'):
      pass


# ---- the commands ----

def _main(args, timeout=300):
  env = helpers_scale.helper_env(1)
  env.pop('MSTKD_TRACEBACK', None)
  return subprocess.run([sys.executable, '-m', 'mstkd_jax.main'] + args, cwd=helpers_scale.ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('mode', ['train', 'eval', 'export'])
def test_a_second_command_on_a_held_folder_fails_at_once_naming_the_holder(tmp_path, mode):
  workdir = tmp_path / 'work'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps({'model': {}}))
  out = tmp_path / 'student'
  held = str(out) if mode == 'export' else str(workdir)
  args = [f'--workdir={workdir}', f'--mode={mode}']
  args += ['--config=brats:tiny'] if mode == 'train' else []
  args += [f'--out={out}'] if mode == 'export' else []
  with workdir_lock.hold(held, 'training'):
    start = time.time()
    proc = _main(args)
    seconds = time.time() - start
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert f'{held} is in use by another job (training, pid {os.getpid()} on ' \
      f'{socket.gethostname()}, since ' in errors[0]
  assert seconds < 60
  assert os.path.isdir(held) and (workdir / 'config.json').exists()   # nothing removed


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
  def no_links(src, dst):
    raise PermissionError(1, 'Operation not permitted')
  monkeypatch.setattr(os, 'link', no_links)
  folder = str(tmp_path / 'work')
  with workdir_lock.hold(folder, 'training'):
    assert workdir_lock.read_holder(folder)['pid'] == os.getpid()
    with pytest.raises(workdir_lock.FolderBusy):
      workdir_lock.hold(folder, 'training').acquire()
  assert os.listdir(folder) == []


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(workdir_lock.FolderNotWritable, match='cannot write into .*a_file/work'):
    workdir_lock.hold(str(blocker / 'work'), 'training').acquire()


def test_a_full_disk_leaves_no_lock_and_no_temporary_file(tmp_path, monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(os, 'fsync', full)
  folder = tmp_path / 'work'
  folder.mkdir()
  with pytest.raises(OSError, match='No space left'):
    workdir_lock.hold(str(folder), 'prediction').acquire()
  assert os.listdir(folder) == []

@pytest.mark.slow
def test_two_training_commands_started_together_one_trains(tmp_path):
  """Both start on a workdir that does not exist yet: one trains to the end, the other stops
  at once naming it, and removes nothing (not even the workdir it saw missing)."""
  workdir = str(tmp_path / 'work')
  env = helpers_scale.helper_env(1)
  env.pop('MSTKD_TRACEBACK', None)
  command = [sys.executable, '-m', 'mstkd_jax.main', '--config=brats:tiny',
             f'--workdir={workdir}', '--max_steps=2', '--config.train.epochs=1']
  logs = [open(tmp_path / f'run{i}.log', 'w+') for i in range(2)]
  procs = [subprocess.Popen(command, cwd=helpers_scale.ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=log) for log in logs]
  results = []
  for proc, log in zip(procs, logs):
    code = proc.wait(timeout=900)
    log.seek(0)
    results.append((code, log.read()))
    log.close()
  codes = sorted(code for code, _ in results)
  assert codes == [0, 2], [text[-2000:] for _, text in results]
  loser = next(text for code, text in results if code == 2)
  assert f'{workdir} is in use by another job (training, pid ' in loser
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f if 'total' in json.loads(line)]
  assert steps == sorted(set(steps)), steps                 # every step once
  assert not os.path.exists(workdir_lock.lock_path(workdir))


@pytest.mark.slow
def test_the_processes_of_one_job_share_its_lock(tmp_path):
  """Two processes of one training job (jax.distributed on 127.0.0.1): process 0 holds the
  workdir's lock, process 1 works under it; both finish, and the lock is gone after."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / 'work')
  procs, logs = [], []
  for index in range(2):
    logs.append(open(tmp_path / f'p{index}.log', 'w+'))
    env = helpers_scale.helper_env(1, MSTKD_COORDINATOR=f'127.0.0.1:{port}',
                                   MSTKD_NUM_PROCESSES=2, MSTKD_PROCESS_ID=index)
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'mstkd_jax.main', '--config=brats:tiny', f'--workdir={workdir}',
         '--max_steps=2', '--config.train.epochs=1'], cwd=helpers_scale.ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=logs[-1]))
  holders = set()
  while any(p.poll() is None for p in procs):
    holder = workdir_lock.read_holder(workdir)
    if holder:
      holders.add(holder['pid'])
    time.sleep(0.5)
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  assert [p.returncode for p in procs] == [0, 0], [t[-2000:] for t in texts]
  assert holders == {procs[0].pid}, holders
  assert not os.path.exists(workdir_lock.lock_path(workdir))
