r"""Build the split and the preprocessing cache ahead of training.

  mstkd-prepare --config=brats --workdir=runs/brats \
      --config.data.root=/data/BraTS2024-GLI [--config.data.workers=8]
  python -m mstkd_jax.data.prepare ...      (the same, in a checkout)

Writes ``<workdir>/split.json`` (unless the config names a split file) and preprocesses every
case of the split into the cache (``config.data.cache_dir``, default ``<workdir>/cache``) with
``config.data.workers`` processes and a progress bar. Cases already cached with the same
settings are not redone; training does the same automatically on first use.
"""

from absl import flags
from absl import logging

from mstkd_jax import cli
from mstkd_jax.data import pipeline


def _define_flags():
  # Defined when the command runs, not on import: main.py defines --config and --workdir in
  # the same global flag registry.
  cli.define_config_flag('config')
  flags.DEFINE_string('workdir', None, 'Run folder (split.json, cache).')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = cli.config_flag('config')
  workdir = flags.FLAGS.workdir
  try:
    dataset = pipeline.prepare(config, workdir, progress=True)
  except (pipeline.BadCaseError, pipeline.DataError) as e:
    if cli.show_tracebacks():
      raise
    cli.fail(cli.one_line(e))
  split = dataset.split
  logging.info('Cache %s: %d cases ready, %d skipped', dataset.cache_folder,
               len(dataset.entries), len(dataset.skipped))
  print(f'split: train {len(split["train"])} / val {len(split["val"])} / '
        f'test {len(split["test"])}; cache {dataset.cache_folder}: {len(dataset.entries)} cases '
        f'ready, {len(dataset.skipped)} skipped')


def console_main():
  """The ``mstkd-prepare`` command (``pip install .``)."""
  cli.run(main, _define_flags, __doc__)


if __name__ == '__main__':
  console_main()
