"""Train, evaluate or export MST-KDNet: the ``mstkd-train`` command.

  mstkd-train --config=brats --workdir=DIR [--mode=train|eval|export] [--config.FIELD=VALUE]
  python -m mstkd_jax.main --config=configs/brats.py --workdir=DIR      (the same, in a checkout)

``--config`` takes a packaged config by name (brats, fets, cpu_real, demo; a variant after a
colon: ``brats:tiny``) or a Python file; eval and export without it read the workdir's
``config.json``.

Modes: ``train`` (default; trains, validates periodically, then evaluates the 15 modality
subsets on the test split), ``eval`` (15-subset evaluation of a checkpoint), ``export`` (the
student and the teacher with the prediction policy, for evaluation and prediction).

Every local device is used (data parallelism). Several processes (hosts) join through
``--coordinator/--num_processes/--process_id``, the ``MSTKD_*`` or ``JAX_*`` variables, or a
SLURM job step (docs/scaling.md).

One job per folder: training and ``--mode=eval`` hold the workdir's lock, ``--mode=export``
the lock of its ``--out`` (``mstkd_jax/workdir_lock.py``); a second command on the same folder
stops at once naming the job that holds it. In a job of several processes process 0 holds it.

Exit status (each failure is one line ``error: ...``; ``MSTKD_TRACEBACK=1`` shows the
traceback):
  0    done
  2    a usage or input error: a bad flag, config field, file (a config.json that is not
       JSON), data folder or checkpoint, or the folder is in use by another job; a workdir
       this command created is removed again
  3    a non-finite loss stopped training (the line names the step and the last good
       checkpoint)
  4    an output could not be written: a full disk or quota, or a failed checkpoint save (the
       line says what, how much space is free and the last good checkpoint; temporary files
       are removed; re-run the same command once there is space)
  128 + signal  SIGTERM (143) or SIGINT (130): training saved a checkpoint (re-run the same
       command to resume); evaluation and export say what was interrupted and whether their
       output is complete (re-running the same command completes an interrupted export)
"""

import os
import sys
import time

from absl import flags, logging

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import (cli, compile_cache, configs, disk, evaluate, export, logging_utils,
                       parallel, run, train, workdir_lock)

FLAGS = flags.FLAGS


def _define_flags():
  """The command's flags, defined when it runs: importing this module (a test, a notebook)
  leaves absl's global flags alone."""
  cli.define_config_flag('config', help_string=(
      'The config: ' + configs.CONFIG_HELP + '. Fields are overridden with '
      '--config.<field>=value, e.g. --config.train.epochs=10. Required to train; eval and '
      "export read the workdir's config.json when it is not given."))
  flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and results.')
  flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export'], 'What to do.')
  flags.DEFINE_string('checkpoint', None, "eval/export: 'latest' (default), 'best', a step "
                      'number, or a path to an exported student / converted network.')
  flags.DEFINE_string('out', None, 'export: output folder (default <workdir>/export).')
  flags.DEFINE_enum('split', 'test', ['test', 'val', 'train'],
                    "eval: which split to evaluate ('train' shows how far the "
                    'networks fit the cases they learned from).')
  flags.DEFINE_bool('allow_config_change', False,
                    'Resume a workdir whose config.json differs from --config.')
  flags.DEFINE_string('coordinator', None, 'Multi-host: coordinator address host:port.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
  flags.DEFINE_integer('max_steps', None, 'train: stop after this many steps (checkpoint saved).')
  flags.DEFINE_bool('overwrite', False, 'export: replace an existing export in --out.')
  flags.DEFINE_bool('export_teacher', True, 'export: also carry the teacher (prediction uses it '
                    'for patients with all four scans when it scored at least as well as the '
                    'student on the run\'s held-out cases).')
  flags.DEFINE_bool('export_scan_choice', False, 'export: also carry a per-region choice of '
                    'scans for the student, where at least 10 held-out cases show fewer scans '
                    'better outside the noise (off by default: cross-fitted it did not pay).')
  flags.DEFINE_bool('verbose_libraries', False, 'Show the INFO lines of Orbax and grain.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.verbose_libraries:
    logging_utils.quiet_libraries()
  disk.quiet_background_errors()
  folder = locked_folder(FLAGS.mode, FLAGS.workdir, FLAGS.out)
  guards = [cli.FolderGuard(FLAGS.workdir)]
  if folder != os.path.abspath(FLAGS.workdir):
    guards.append(cli.FolderGuard(folder, keep=('variables',)))
  started = time.time()
  main_process = False     # known once the processes joined; only process 0 removes folders
  try:
    config = workdir_config(cli.config_flag('config'), FLAGS.workdir, FLAGS.mode)
    compile_cache.enable()
    parallel.maybe_initialize_distributed(FLAGS.coordinator, FLAGS.num_processes,
                                          FLAGS.process_id)
    main_process = parallel.is_main_process()
    with cli.raise_on_signals(), job_lock(folder, PURPOSES[FLAGS.mode]):
      run_mode(config)
  except cli.Interrupted as e:
    cli.fail(interrupted_message(e, FLAGS.mode, folder, started), status=e.status)
  except train.TrainingStopped as e:
    logging.error('%s', e)
    sys.exit(3)
  except Exception as e:  # pylint: disable=broad-except
    if cli.show_tracebacks():
      raise
    if isinstance(e, train.CheckpointSaveError):
      cli.fail(str(e), status=cli.WRITE_ERROR)
    if disk.is_full(e):
      cli.fail(full_disk_message(e, FLAGS.mode, folder), status=cli.WRITE_ERROR)
    if not isinstance(e, (cli.InputError, FileNotFoundError, FileExistsError,
                          NotADirectoryError)):
      raise
    if main_process and not isinstance(e, workdir_lock.FolderBusy):   # not another job's
      for guard in guards:
        guard.cleanup()
    cli.fail(cli.one_line(e))


PURPOSES = {'train': 'training', 'eval': 'evaluation', 'export': 'export'}


def locked_folder(mode, workdir, out):
  """The folder a mode writes into and locks: the workdir, or an export's ``--out``."""
  return export.output_folder(workdir, out) if mode == 'export' else os.path.abspath(workdir)


class _JobLock:
  """``folder``'s lock for the whole job: process 0 takes it, every process learns whether it
  did (a collective), so that all stop together when another job holds it."""

  def __init__(self, folder, purpose):
    self.lock = workdir_lock.hold(folder, purpose)
    self.folder = folder

  def __enter__(self):
    failure = None
    if parallel.is_main_process():
      try:
        self.lock.acquire()
      except Exception as e:  # pylint: disable=broad-except
        failure = e
    if parallel.any_process(failure is not None):
      if failure is not None:
        raise failure
      raise workdir_lock.FolderBusy(self.folder, workdir_lock.read_holder(self.folder),
                                    workdir_lock.lock_path(self.folder))
    return self

  def __exit__(self, *exc):
    self.lock.release()
    return False


def job_lock(folder, purpose):
  return _JobLock(folder, purpose)


def interrupted_message(error, mode, folder, started):
  """What a signal interrupted and whether the output is complete."""
  what = f'stopped by {error.name}'
  if mode == 'export':
    if export.is_complete(folder):
      return f'{what} after the export completed: {folder} is complete'
    return (f'{what} during the export: {folder} holds no complete export; re-run the same '
            'command to complete it')
  if mode == 'eval':
    summary = os.path.join(evaluate.output_dir(FLAGS.workdir, FLAGS.split), 'summary.json')
    if os.path.exists(summary) and os.path.getmtime(summary) >= started:
      return f'{what} after the evaluation was written: {os.path.dirname(summary)} is complete'
    return (f'{what} during the evaluation: {os.path.dirname(summary)} holds no results of this '
            'run; re-run the same command to evaluate')
  steps = ckpt.saved_steps(os.path.join(folder, 'checkpoints'))
  last = f'the last checkpoint is step {steps[-1]}' if steps else 'no checkpoint was saved yet'
  return (f'{what} outside the training steps (preparing the data or evaluating): {last}; '
          're-run the same command to continue')


def full_disk_message(error, mode, folder):
  """One line for a write that failed on a full disk: what, the free space, the last good
  checkpoint of a training run. Removes the temporary folders of interrupted Orbax writes."""
  target = getattr(error, 'filename', None) or folder
  where = os.path.dirname(target) if os.path.isfile(target) else target
  if mode == 'export':
    disk.remove_orbax_temporaries(folder)
  message = f'could not write {target}: No space left on device ({disk.space(where)})'
  if mode == 'train':
    steps = ckpt.saved_steps(os.path.join(folder, 'checkpoints'))
    message += (f'; the last good checkpoint is step {steps[-1]} in {folder}/checkpoints'
                if steps else '; no checkpoint was saved yet')
  return message + '. Free space, then re-run the same command.'


def workdir_config(config, workdir, mode):
  """The config to run: ``--config`` when given; for eval and export without it, the
  workdir's ``config.json`` (the checkpoint's networks are checked against a given one)."""
  if config is not None:
    return config
  if mode == 'train':
    cli.fail(f'--config is required to train: {configs.CONFIG_HELP} (e.g. --config=demo)')
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    cli.fail(f'{workdir} has no config.json (is it a training workdir?); give --config')
  config = ckpt.load_config(workdir)
  config.lock()
  return config


def run_mode(config):
  if FLAGS.mode == 'train':
    run.train_and_evaluate(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change,
                           max_steps=FLAGS.max_steps)
  elif FLAGS.mode == 'eval':
    evaluate.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint, split=FLAGS.split)
  elif FLAGS.mode == 'export':
    path = export.export_student(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.out,
                                 overwrite=FLAGS.overwrite, teacher=FLAGS.export_teacher,
                                 choose_scans=FLAGS.export_scan_choice)
    logging.info('exported the student to %s', path)


def console_main():
  """The ``mstkd-train`` command (``pip install .``): ``python -m mstkd_jax.main``."""
  cli.run(main, _define_flags, __doc__)


if __name__ == '__main__':
  console_main()
