"""The errors of prediction, with messages meant for the user: ``PredictionError`` (a problem
with the inputs, the output location or the checkpoint: one line, exit status 2) and
``OutputWriteError`` (an output could not be written, e.g. a full disk: one line, exit
status 4)."""

import os
import shutil


class PredictionError(ValueError):
  """A problem with the inputs or the checkpoint, with a message meant for the user."""


class OutputWriteError(Exception):
  """An output file could not be written (no space left, permissions): the run stops."""


def write_error(error: OSError, path) -> OutputWriteError:
  """An ``OutputWriteError`` naming ``path``, the reason and the free space of its folder."""
  folder = os.path.dirname(os.path.abspath(path))
  try:
    free = f'; {shutil.disk_usage(folder).free / 1e6:.1f} MB free in {folder}'
  except OSError:
    free = ''
  return OutputWriteError(f'cannot write {path}: {error.strerror or error}{free}')
