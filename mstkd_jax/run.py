"""A training run, wired: data -> training loop (with the validator) -> test evaluation ->
figure and learning curves. What ``python -m mstkd_jax.main --mode=train`` runs.

Training (train.py) and evaluation (evaluate.py) know nothing of each other; this face joins
them: it prepares the run's ``Dataset`` once, gives the loop the evaluation's validator as a
callback, evaluates the final state on the test split, then draws the learning curves
(``<workdir>/curves.png``) and, with ``config.eval.figure``, the Figure-2 picture.
"""

import os

import jax
from absl import logging

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import evaluate, optim, parallel, train
from mstkd_jax.data import pipeline


def train_and_evaluate(config, workdir, allow_config_change=False, max_steps=None):
  """Trains on ``config.data`` (synthetic cases when no root is given), validating every
  ``eval_every_epochs`` epochs, then evaluates the 15 modality subsets on the test split."""
  os.makedirs(workdir, exist_ok=True)
  # Refuse a workdir of another config before any data work (train_loop checks again).
  if ckpt.saved_steps(os.path.join(workdir, 'checkpoints')):
    train.check_workdir_config(config, workdir, allow_config_change)

  if parallel.is_main_process():
    # Process 0 writes synthetic cases, the split and the preprocessing cache; the others
    # wait, then find them in place (on a shared filesystem).
    logging.info('data: %s', pipeline.resolve_root(config, workdir))
    dataset = pipeline.prepare(config, workdir)
  parallel.sync('mstkd_data_prepared')
  if not parallel.is_main_process():
    dataset = pipeline.prepare(config, workdir, progress=False)
  per_process_batch = config.train.batch_size_per_device * jax.local_device_count()
  train_iter = pipeline.make_train_loader(
      dataset, batch_size=per_process_batch, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  num_train = len(dataset.ids('train'))
  steps_per_epoch = optim.steps_per_epoch(
      config, num_train, config.train.batch_size_per_device * jax.device_count())
  logging.info('%d training cases, %d steps per epoch, %d epochs', num_train, steps_per_epoch,
               config.train.epochs)
  validate = evaluate.make_validator(config, dataset) if dataset.split['val'] else None
  try:
    state = train.train_loop(config, workdir, train_iter, steps_per_epoch, validate=validate,
                             allow_config_change=allow_config_change, max_steps=max_steps)
  finally:
    train_iter.close()
  if dataset.split['test']:
    evaluate.evaluate_state(config, dataset, state, split='test')
  if jax.process_index() == 0:
    # Imported here: matplotlib costs a second or more of every start.
    from mstkd_jax import visualize  # pylint: disable=import-outside-toplevel
    curves = visualize.learning_curves(workdir)
    if curves:
      logging.info('learning curves: %s', curves)
    if config.eval.get('figure', False):
      visualize.figure_after_training(config, dataset, state)
  return state
