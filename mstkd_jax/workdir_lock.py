"""One job per folder: a lock file that names its holder.

A command that writes into a folder (training or ``--mode=eval`` into a workdir, an export or
a prediction into its ``--out``) holds ``<folder>/.mstkd.lock`` while it runs::

  with workdir_lock.hold(folder, 'training'):
    ...

A second command on the same folder stops at once with ``FolderBusy``, one line naming the
holder: what it does, its pid and host, since when, and the lock file. The lock is released
when the block ends (also on an error or a signal that unwinds the stack). In a job of several
processes the command lets process 0 alone take it (``main.job_lock``); the others work
under it.

The lock file is JSON: ``host``, ``pid``, ``pid_start`` (the process's start time, which tells
a reused pid apart), ``boot_id``, ``started``, ``purpose``, ``command`` and a random ``token``.

Taking it, also on a shared filesystem: the record is written whole to a private temporary
file, which is then hard-linked to the lock's name. ``link`` either creates the name or fails
because the name exists, atomically, on local filesystems and on NFS alike (``O_EXCL``
creation is atomic on NFS only from NFSv3 on, with a server that supports it); where the
server's reply is lost, the temporary file's link count tells whether the link was made. A
reader therefore never sees half a record. Filesystems without hard links fall back to
``O_CREAT | O_EXCL``.

A lock is stale, and taken over, when its holder is gone:

  * same host: its pid no longer runs, runs another program (another start time), is a
    zombie, or the machine has rebooted since (another boot id);
  * another host: its heartbeat stopped. The holder touches the lock file every
    ``HEARTBEAT_S`` seconds (a daemon thread); a lock not touched for ``STALE_AFTER_S``
    seconds is stale. The age is the lock file's modification time against this host's
    clock, so hosts must keep their clocks within a few minutes of each other (NTP), and NFS
    attribute caching may show a modification time up to a minute old: hence minutes, not
    seconds. A holder that was suspended (SIGSTOP, a frozen virtual machine) for longer may
    lose its lock; its heartbeat then logs a warning.

Taking over: among several commands that find the same stale lock, the one that creates the
claim file ``.mstkd.lock.takeover-<token of the stale holder>`` (exclusively) removes the stale
lock; then all try to take the lock afresh, and one wins. A claim older than ``STALE_AFTER_S``
(its taker died within those milliseconds) is removed.
"""

import atexit
import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging

from mstkd_jax.cli import InputError
from mstkd_jax.disk import FULL_ERRNOS

LOCK_NAME = '.mstkd.lock'
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
_ATTEMPTS = 5


class FolderNotWritable(InputError):
  """The folder cannot be created or written (permissions, a read-only filesystem)."""


class FolderBusy(InputError):
  """Another job holds the folder's lock (the message names it and the lock file)."""

  def __init__(self, folder, holder, path):
    self.folder, self.holder, self.path = folder, holder, path
    super().__init__(busy_message(folder, holder, path))


def busy_message(folder, holder, path):
  """``<folder> is in use by another job (training, pid 12 on node7 since ...)`` with what to
  do; ``holder`` is the lock file's record (None when it could not be read)."""
  if holder is None:
    who = 'a lock file that is being written or cannot be read'
  else:
    who = (f'{holder.get("purpose", "a job")}, pid {holder.get("pid")} on '
           f'{holder.get("host")}, since {holder.get("started")}')
    if holder.get('host') != socket.gethostname():
      age = _age(path)
      if age is not None:
        who += (f'; last heartbeat {age:.0f} s ago, taken over after {STALE_AFTER_S:.0f} s '
                'without one')
    if _same_process(holder):
      who += '; this very process'
  return (f'{folder} is in use by another job ({who}; lock file {path}). Wait for it to end '
          'or use another folder; if that job is gone and the lock was not taken over '
          'automatically, delete the lock file.')


def lock_path(folder):
  return os.path.join(os.path.abspath(folder), LOCK_NAME)


def read_holder(folder):
  """The record of the job holding ``folder`` (a dict), or None when it is free."""
  record, _ = _read(lock_path(folder))
  return record


class FolderLock:
  """The lock of one folder, held by this process (see the module doc)."""

  def __init__(self, folder, purpose):
    self.folder = os.path.abspath(folder)
    self.path = lock_path(folder)
    self.purpose = purpose
    self.record = None
    self._stop = threading.Event()
    self._thread = None

  def acquire(self):
    """Takes the lock (creating the folder) or raises FolderBusy; a stale lock is taken
    over. A folder that cannot be written raises FolderNotWritable, a full disk OSError."""
    try:
      return self._acquire()
    except OSError as e:
      if e.errno in FULL_ERRNOS:
        raise
      raise FolderNotWritable(f'cannot write into {self.folder} ({e.strerror}): it must be a '
                              'folder this user can write') from e

  def _acquire(self):
    os.makedirs(self.folder, exist_ok=True)
    self.record = _new_record(self.purpose)
    for _ in range(_ATTEMPTS):
      if _create(self.path, self.record):
        return self._held()
      holder, readable = _read(self.path)
      if readable is None:
        continue                       # removed meanwhile: try again
      if holder is not None and holder.get('token') == self.record['token']:
        return self._held()            # NFS: our link was made, its reply was lost
      reason = _stale_reason(holder, self.path)
      if reason is None:
        raise FolderBusy(self.folder, holder, self.path)
      if _take_over(self.path, holder):
        logging.warning('%s: took over the lock of a job that is gone (%s)', self.folder,
                        reason)
      time.sleep(0.05)
    holder, _ = _read(self.path)
    raise FolderBusy(self.folder, holder, self.path)

  def _held(self):
    self._start_heartbeat()
    atexit.register(self.release)
    return self

  def release(self):
    """Stops the heartbeat and removes the lock file if it is still this process's."""
    atexit.unregister(self.release)
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=5)
    self._thread = None
    if self.record is None:
      return
    holder, _ = _read(self.path)
    if holder is not None and holder.get('token') == self.record['token']:
      try:
        os.remove(self.path)
      except OSError:
        pass
    self.record = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False

  def _start_heartbeat(self):
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name='mstkd-lock-heartbeat',
                                    daemon=True)
    self._thread.start()

  def _beat(self):
    token = self.record['token']
    while not self._stop.wait(HEARTBEAT_S):
      holder, _ = _read(self.path)
      if holder is None or holder.get('token') != token:
        logging.warning('the lock of %s was taken over by another job (%s): two jobs may now '
                        'write into it', self.folder,
                        'none' if holder is None else
                        f'pid {holder.get("pid")} on {holder.get("host")}')
        return
      try:
        os.utime(self.path)
      except OSError as e:
        logging.warning('cannot refresh the lock of %s (%s)', self.folder, e)


def hold(folder, purpose):
  """A ``FolderLock`` of ``folder`` for ``purpose`` ('training', 'evaluation', 'export',
  'prediction'), to use as a context manager."""
  return FolderLock(folder, purpose)


# ---- the record and the process it names ----

def _new_record(purpose):
  return {
      'host': socket.gethostname(), 'pid': os.getpid(), 'pid_start': _start_ticks(os.getpid()),
      'boot_id': _boot_id(),
      'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
      'purpose': purpose, 'command': ' '.join(sys.argv)[:500], 'token': uuid.uuid4().hex}


def _proc_stat(pid):
  """The fields of /proc/<pid>/stat after the command name (None off Linux or when gone)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      text = f.read()
  except OSError:
    return None
  return text[text.rfind(')') + 2:].split()


def _start_ticks(pid):
  fields = _proc_stat(pid)
  return int(fields[19]) if fields and len(fields) > 19 else None


def _boot_id():
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return None


def _same_process(holder):
  return (holder.get('host') == socket.gethostname() and holder.get('pid') == os.getpid()
          and holder.get('pid_start') == _start_ticks(os.getpid()))


def _pid_gone(holder):
  """Why the holder (on this host) no longer runs, or None while it does."""
  pid = holder.get('pid')
  if not isinstance(pid, int):
    return 'no pid recorded'
  if holder.get('boot_id') and _boot_id() and holder['boot_id'] != _boot_id():
    return 'the machine has rebooted since'
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return f'pid {pid} no longer runs'
  except PermissionError:
    pass                               # another user's process: it runs
  fields = _proc_stat(pid)
  if fields is None:
    return None
  if fields[0] == 'Z':
    return f'pid {pid} has ended'
  if holder.get('pid_start') is not None and int(fields[19]) != holder['pid_start']:
    return f'pid {pid} now belongs to another program'
  return None


def _age(path):
  try:
    return time.time() - os.stat(path).st_mtime
  except OSError:
    return None


def _stale_reason(holder, path):
  """Why the lock at ``path`` is stale, or None while its holder may still run."""
  if holder is not None and holder.get('host') == socket.gethostname():
    return _pid_gone(holder)
  age = _age(path)
  if age is not None and age > STALE_AFTER_S:
    where = f'host {holder.get("host")}' if holder else 'an unreadable lock'
    return f'no heartbeat from {where} for {age:.0f} s'
  return None


# ---- the file operations ----

def _read(path):
  """(record or None, text or None): text None when there is no lock file."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None, None
  except OSError:
    return None, ''
  try:
    record = json.loads(text)
  except ValueError:
    return None, text
  return (record if isinstance(record, dict) else None), text


def _create(path, record):
  """Creates the lock file holding ``record``; False when it exists."""
  data = json.dumps(record, indent=1).encode()
  tmp = f'{path}.{record["token"]}.tmp'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  except OSError:                      # e.g. a full disk: leave nothing behind
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  try:
    try:
      os.link(tmp, path)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      if os.stat(tmp).st_nlink == 2:   # NFS: the link was made, the reply was lost
        return True
      if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                         errno.ENOSYS):
        raise
    return _create_exclusive(path, data)
  finally:
    os.remove(tmp)


def _create_exclusive(path, data):
  """``_create`` where hard links are not supported: O_CREAT | O_EXCL, then the record."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  return True


def _take_over(path, holder):
  """Removes the stale lock of ``holder`` when this process wins the claim; True then."""
  token = (holder or {}).get('token') or 'unreadable'
  claim = f'{path}.takeover-{token}'
  try:
    fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    age = _age(claim)
    if age is not None and age > STALE_AFTER_S:
      try:
        os.remove(claim)
      except OSError:
        pass
    return False
  os.close(fd)
  try:
    current, _ = _read(path)
    if (current or {}).get('token', 'unreadable') != token:
      return False                     # someone else took it over meanwhile
    os.remove(path)
    return True
  except FileNotFoundError:
    return False
  finally:
    os.remove(claim)
