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
SLURM job step (docs/scaling.md). Exit status: 0 done; 2 a usage or input error (one line
``error: ...``; ``MSTKD_TRACEBACK=1`` shows the traceback; a workdir this command created is
removed again); 128 + signal after SIGTERM / SIGINT (a checkpoint was saved: re-run the same
command to resume); 3 after a non-finite loss; 4 when a checkpoint could not be written (the
message names the last good one).
"""

import os
import sys

from absl import flags, logging

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import (cli, compile_cache, configs, evaluate, export, logging_utils, parallel,
                       run, train)

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
  flags.DEFINE_bool('verbose_libraries', False, 'Show the INFO lines of Orbax and grain.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.verbose_libraries:
    logging_utils.quiet_libraries()
  config = workdir_config(cli.config_flag('config'), FLAGS.workdir, FLAGS.mode)
  compile_cache.enable()
  guard = cli.FolderGuard(FLAGS.workdir)
  try:
    run_mode(config)
  except (cli.InputError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
    if cli.show_tracebacks():
      raise
    guard.cleanup()
    cli.fail(cli.one_line(e))


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
  parallel.maybe_initialize_distributed(FLAGS.coordinator, FLAGS.num_processes,
                                        FLAGS.process_id)
  if FLAGS.mode == 'train':
    try:
      run.train_and_evaluate(config, FLAGS.workdir,
                               allow_config_change=FLAGS.allow_config_change,
                               max_steps=FLAGS.max_steps)
    except train.TrainingStopped as e:
      logging.error('%s', e)
      sys.exit(3)
    except train.CheckpointSaveError as e:
      if cli.show_tracebacks():
        raise
      cli.fail(str(e), status=4)
  elif FLAGS.mode == 'eval':
    evaluate.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint, split=FLAGS.split)
  elif FLAGS.mode == 'export':
    path = export.export_student(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.out,
                                 overwrite=FLAGS.overwrite, teacher=FLAGS.export_teacher)
    logging.info('exported the student to %s', path)


def console_main():
  """The ``mstkd-train`` command (``pip install .``): ``python -m mstkd_jax.main``."""
  cli.run(main, _define_flags, __doc__)


if __name__ == '__main__':
  console_main()
