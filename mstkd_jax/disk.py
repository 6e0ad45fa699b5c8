"""Full disks and failed writes: how much space there is, which errors mean "full", one line.

``is_full(error)`` recognises a disk or quota that is full, as an ``OSError`` (ENOSPC, EDQUOT)
or as the ``ValueError`` into which Orbax wraps TensorStore's ``RESOURCE_EXHAUSTED``.
``space(path)`` says how much is free on the filesystem of ``path``; ``enough_for(path,
needed)`` is the check a command makes before a write of known size (a checkpoint like the
last one). ``quiet_background_errors()`` keeps the reports of background writers that fail
after the real error (Orbax's and TensorStore's threads and coroutines, hundreds when a disk
fills during a checkpoint save) off the terminal, so that the command's one ``error:`` line is
what the user reads; ``MSTKD_TRACEBACK=1`` shows them.
"""

import errno
import glob
import logging
import os
import re
import shutil
import sys
import threading

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='?(28|122)")


def is_full(error):
  """True when ``error`` (or an error it was raised from) says the disk or quota is full."""
  seen = 0
  while error is not None and seen < 10:
    if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
      return True
    if isinstance(error, (OSError, ValueError, RuntimeError)) and _FULL_TEXT.search(str(error)):
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


def free_bytes(path):
  """Bytes free for this user on the filesystem of ``path`` (its nearest existing parent), or
  None where the filesystem does not say (a size of 0 blocks: some network and FUSE mounts)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  st = os.statvfs(path)
  return st.f_bavail * st.f_frsize if st.f_blocks else None


def folder_bytes(path):
  """The bytes of the files under ``path``."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total


def megabytes(n):
  return f'{n / 1e6:.1f} MB'


def space(path):
  """``'3.2 MB free on the filesystem of <path>'`` (or why that is unknown)."""
  try:
    free = free_bytes(path)
  except OSError as e:
    return f'free space of {path} unknown ({e.strerror})'
  if free is None:
    return f'free space of {path} unknown'
  return f'{megabytes(free)} free on the filesystem of {path}'


def enough_for(path, needed):
  """None when ``needed`` bytes fit on the filesystem of ``path``, else the free bytes."""
  try:
    free = free_bytes(path)
  except OSError:
    return None
  return None if free is None or free >= needed else free


def remove_orbax_temporaries(directory):
  """Removes the temporary folders of Orbax saves that did not complete (``<step>.orbax-
  checkpoint-tmp*``); returns their names. Call it only when no save is in flight."""
  removed = []
  for path in sorted(glob.glob(os.path.join(glob.escape(directory), '*.orbax-checkpoint-tmp*'))):
    shutil.rmtree(path, ignore_errors=True)
    removed.append(os.path.basename(path))
  return removed


# ---- the reports of failing background writers ----

_NOISE = re.compile(r'Event loop is closed|sys\.meta_path is None|handle is closed')
_installed = []


def _is_noise(error):
  """A background writer failing after the real error: a closed event loop, interpreter
  shutdown, a closed file handle, or a full disk seen by a thread or coroutine of Orbax,
  TensorStore or tensorboardX."""
  return bool(_NOISE.search(f'{type(error).__name__}: {error}')) or is_full(error)


def quiet_background_errors():
  """Installs hooks (once per process) that drop the reports of ``_is_noise`` errors of
  threads, of ``__del__`` and callbacks (unraisable), of native threads (printed through
  ``sys.excepthook``) and of asyncio's and Orbax's error logs; every other report passes
  unchanged. Not with ``MSTKD_TRACEBACK=1``."""
  if _installed or os.environ.get('MSTKD_TRACEBACK', '') not in ('', '0'):
    return
  _installed.append(True)
  thread_hook, unraisable_hook, except_hook = (threading.excepthook, sys.unraisablehook,
                                               sys.excepthook)

  def on_thread(args):
    if not _is_noise(args.exc_value):
      thread_hook(args)

  def on_unraisable(args):
    if args.exc_value is None or not _is_noise(args.exc_value):
      unraisable_hook(args)

  def on_except(kind, value, traceback):
    if threading.current_thread() is threading.main_thread() or not _is_noise(value):
      except_hook(kind, value, traceback)

  threading.excepthook = on_thread
  sys.unraisablehook = on_unraisable
  sys.excepthook = on_except
  for name in ('asyncio', 'absl'):
    logging.getLogger(name).addFilter(_WriterNoise())


class _WriterNoise(logging.Filter):
  """Error records of the writes that failed with the real error: asyncio's "exception was
  never retrieved", Orbax's reports of its failed save threads (a full disk)."""

  def filter(self, record):
    if record.levelno < logging.ERROR:
      return True
    error = record.exc_info[1] if record.exc_info else None
    noise = error is not None and _is_noise(error)
    if record.name == 'absl':
      noise = (noise or bool(_FULL_TEXT.search(str(record.msg)))) and (
          f'{os.sep}orbax{os.sep}' in (record.pathname or ''))
    return not noise
