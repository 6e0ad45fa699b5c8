"""Metric logs: a JSON-lines file, TensorBoard event files (tensorboardX, no TensorFlow) and a
progress bar on terminals. Only process 0 writes (``enabled=False`` elsewhere)."""

import importlib
import json
import logging as py_logging
import os
import sys
import threading
import time

import tqdm
from absl import logging

from mstkd_jax.fileio import write_text_atomic


class _LibraryInfoFilter(py_logging.Filter):
  """Drops INFO/DEBUG records logged from inside the given packages (Orbax reports every
  save in a dozen lines); warnings and errors pass."""

  def __init__(self, packages):
    super().__init__()
    self._parts = tuple(f'{os.sep}{p}{os.sep}' for p in packages)

  def filter(self, record):
    path = record.pathname or ''
    if not any(part in path for part in self._parts):
      return True
    if record.levelno >= py_logging.WARNING:
      # Orbax warns on every save without a validation score; that is the normal case here.
      return 'tracked_metric' not in str(record.msg)
    return False


def quiet_libraries(packages=('orbax', 'grain', 'jax')):
  """Keeps library INFO chatter (Orbax's option dumps, grain, jax's backend probing) out of
  the log; their warnings and errors still pass."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter(packages))


def describe_memory(compiled):
  """One line from ``compiled.memory_analysis()`` (bytes the compiled step needs)."""
  info = memory_dict(compiled)
  if not info:
    return 'memory analysis unavailable'
  gib = lambda b: b / 2 ** 30
  return ('memory: arguments %.2f GiB, outputs %.2f GiB, temporaries %.2f GiB, '
          'aliased %.2f GiB' % (gib(info['argument_bytes']), gib(info['output_bytes']),
                                gib(info['temp_bytes']), gib(info['alias_bytes'])))


def memory_dict(compiled):
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return {}
  if m is None:
    return {}
  return {'temp_bytes': int(m.temp_size_in_bytes),
          'argument_bytes': int(m.argument_size_in_bytes),
          'output_bytes': int(m.output_size_in_bytes),
          'alias_bytes': int(m.alias_size_in_bytes),
          'generated_code_bytes': int(m.generated_code_size_in_bytes)}


class _LogAboveBars:
  """While progress bars are shown, log records reach the terminal with the bars cleared
  first and redrawn after (tqdm's ``external_write_mode``), so that a log line never runs into
  a bar. Applied to the root logger's handlers (absl's among them) for as long as a bar is
  open; nested bars share it."""

  _open_bars = 0

  @classmethod
  def start(cls):
    cls._open_bars += 1
    root = py_logging.getLogger()
    if not root.handlers:
      # What absl.logging does on its first record outside absl's app.run: done now, so that
      # the handler exists to be covered.
      py_logging.basicConfig()
    cls.cover()

  @classmethod
  def cover(cls):
    """Covers the root logger's handlers not covered yet (one added while a bar is open)."""
    if cls._open_bars:
      for handler in py_logging.getLogger().handlers:
        if not getattr(handler.handle, 'above_bars', False):
          handler.handle = cls._wrap(handler.handle)   # an instance attribute, removed in stop

  @classmethod
  def stop(cls):
    cls._open_bars = max(cls._open_bars - 1, 0)
    if cls._open_bars == 0:
      for handler in py_logging.getLogger().handlers:
        if getattr(handler.handle, 'above_bars', False):
          del handler.handle

  @staticmethod
  def _wrap(handle):
    def handle_above_bars(record):
      with tqdm.tqdm.external_write_mode(file=sys.stderr):
        return handle(record)
    handle_above_bars.above_bars = True
    return handle_above_bars


class Progress:
  """The one progress display: a tqdm bar on a terminal (log lines are written above it);
  elsewhere (log files, SLURM, pipes) no bar but a log line with the count, elapsed time and
  ETA about every 10 % or 60 s (``log_lines=False``: nothing, for loops that log their own
  lines). ``update(n)`` adds n; ``update_to(done)`` sets it."""

  def __init__(self, total, desc, unit='case', initial=0, enabled=True, log_lines=True):
    self.total, self.desc, self.unit = int(total), desc, unit
    self.done = self._initial = int(initial)
    self.start = self._last_log = time.time()
    self.enabled, self.log_lines = enabled, log_lines
    self._bar = None
    if enabled and sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit,
                            dynamic_ncols=True)
      _LogAboveBars.start()

  def update(self, n=1):
    self.update_to(self.done + n)

  def update_to(self, done):
    step, self.done = done - self.done, int(done)
    if self._bar is not None:
      _LogAboveBars.cover()
      self._bar.update(step)
      return
    if not (self.enabled and self.log_lines):
      return
    now = time.time()
    tenth = max(1, self.total // 10)
    if self.done == self.total or self.done % tenth == 0 or now - self._last_log > 60:
      self._last_log = now
      elapsed = now - self.start
      rate = (self.done - self._initial) / max(elapsed, 1e-9)
      eta = (self.total - self.done) / max(rate, 1e-9)
      logging.info('%s: %d/%d %ss, %.1f s elapsed, ETA %.0f s', self.desc, self.done,
                   self.total, self.unit, elapsed, eta)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None
      _LogAboveBars.stop()


# Training-log names of the logged values (metrics.jsonl keeps the keys): losses say so.
SHOWN = {'total': 'loss', 'dice': 'dice_loss', 'dice_student': 'student_dice_loss',
         'learning_rate': 'lr', 'steps_per_s': 'steps/s', 'eta_s': 'ETA s'}
VALIDATION_LABELS = {'val_dice': 'val Dice (student)', 'val_teacher_dice': 'val Dice (teacher)'}


def drop_records_after(workdir, step):
  """Rewrites ``<workdir>/metrics.jsonl`` without the records after ``step`` (those of steps
  lost in a crash, which a resumed run logs again), so that a plot of the file is right."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)['step']) <= step:
        keep.append(line)
    except (ValueError, KeyError):
      continue   # a half-written last line
  if len(keep) != len(lines):
    write_text_atomic(path, ''.join(keep))
  return len(lines) - len(keep)


def preload_tensorboard():
  """Imports TensorBoard's writer (tensorboardX: seconds of imports) in a thread, so that a
  ``MetricWriter`` made later finds it ready; the training loop calls it while its programs
  load."""

  def load():
    try:
      importlib.import_module('tensorboardX')
    except ImportError:
      pass

  threading.Thread(target=load, name='mstkd-tensorboard-import', daemon=True).start()


class MetricWriter:
  """Appends {'step', 'time', **values} lines to <workdir>/metrics.jsonl and writes the same
  scalars as TensorBoard events under <workdir>/tensorboard."""

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    self._tb = None
    self._file = None
    if not enabled:
      return
    self._file = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      logging.info('tensorboardX is not installed: no TensorBoard events')

  def write(self, step, values):
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time(), **values}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
    shown = {label: values[k] for k, label in SHOWN.items() if k in values}
    shown.update({VALIDATION_LABELS.get(k, k): v for k, v in values.items()
                  if k.startswith('val_')})
    logging.info('step %d: %s', step, ', '.join(f'{k} {v:.4g}' for k, v in shown.items()))

  def progress(self, total, initial):
    """A step progress bar on terminals (the log lines above carry steps/s and ETA)."""
    return Progress(total, 'train', unit='step', initial=initial, enabled=self.enabled,
                    log_lines=False)

  def close(self, quiet=False):
    """Closes both logs; ``quiet``: an error while closing (a full disk) is dropped, as when
    another error is already on its way to the user."""
    for log in (self._file, self._tb):
      if log is None:
        continue
      try:
        log.close()
      except (OSError, ValueError):
        if not quiet:
          raise
    self._file = self._tb = None
