"""Metric logs: a JSON-lines file, TensorBoard event files (tensorboardX, no TensorFlow) and a
progress bar on terminals. Only process 0 writes (``enabled=False`` elsewhere)."""

import json
import logging as py_logging
import os
import sys
import time

from absl import logging


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


def quiet_libraries(packages=('orbax', 'grain')):
  """Keeps library INFO chatter (Orbax, grain) out of the training log."""
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


class _Progress:
  """tqdm on a terminal, nothing otherwise (the log lines carry steps/s and ETA)."""

  def __init__(self, total, initial, enabled):
    self._bar = None
    if enabled and sys.stderr.isatty():
      try:
        from tqdm import tqdm
        self._bar = tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True)
      except ImportError:
        pass

  def update(self, step):
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def close(self):
    if self._bar is not None:
      self._bar.close()


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
    shown = {k: values[k] for k in ('total', 'dice', 'dice_student', 'learning_rate',
                                    'steps_per_s', 'eta_s') if k in values}
    shown.update({k: v for k, v in values.items() if k.startswith('val_')})
    logging.info('step %d: %s', step, ', '.join(f'{k} {v:.4g}' for k, v in shown.items()))

  def progress(self, total, initial):
    return _Progress(total, initial, self.enabled)

  def close(self):
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
