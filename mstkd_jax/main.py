"""Command line: ``python -m mstkd_jax.main --config=configs/brats.py --workdir=DIR [--mode=...]``.

Modes: ``train`` (default; trains, validates periodically, then evaluates the 15 modality
subsets on the test split), ``eval`` (15-subset evaluation of a checkpoint), ``export`` (the
student alone, for evaluation and prediction).

Every local device is used (data parallelism). Several processes (hosts) join through
``--coordinator/--num_processes/--process_id``, the ``MSTKD_*`` or ``JAX_*`` variables, or a
SLURM job step (docs/scaling.md). Exit status: 0 done; 128 + signal after SIGTERM / SIGINT
(a checkpoint was saved: re-run the same command to resume); 3 after a non-finite loss.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mstkd_jax import evaluate, export, parallel, run, train
from mstkd_jax.cli import underscore_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Python config file (configs/*.py[:variant]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export'], 'What to do.')
flags.DEFINE_string('checkpoint', None, "eval/export: 'latest' (default), 'best', a step "
                    'number, or a path to an exported student / converted network.')
flags.DEFINE_string('out', None, 'export: output folder (default <workdir>/export).')
flags.DEFINE_string('split', 'test', "eval: which split to evaluate ('test' or 'val').")
flags.DEFINE_bool('allow_config_change', False,
                  'Resume a workdir whose config.json differs from --config.')
flags.DEFINE_string('coordinator', None, 'Multi-host: coordinator address host:port.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.DEFINE_integer('max_steps', None, 'train: stop after this many steps (checkpoint saved).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  parallel.maybe_initialize_distributed(FLAGS.coordinator, FLAGS.num_processes,
                                        FLAGS.process_id)
  config = FLAGS.config
  if FLAGS.mode == 'train':
    try:
      run.train_and_evaluate(config, FLAGS.workdir,
                               allow_config_change=FLAGS.allow_config_change,
                               max_steps=FLAGS.max_steps)
    except train.TrainingStopped as e:
      logging.error('%s', e)
      sys.exit(3)
  elif FLAGS.mode == 'eval':
    evaluate.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint, split=FLAGS.split)
  elif FLAGS.mode == 'export':
    path = export.export_student(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.out)
    logging.info('exported the student to %s', path)


if __name__ == '__main__':
  app.run(main, argv=underscore_flags(sys.argv))
