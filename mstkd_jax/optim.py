"""The optimisers (docs/method.md, "Optimisation and data"): Adam with PyTorch's L2 for the networks, Adam for the
discriminator, and the poly learning-rate decay."""

import jax
import jax.numpy as jnp
import optax


def steps_per_epoch(config, num_train_cases=None, global_batch_size=None):
  """Steps in one epoch: ``config.train.steps_per_epoch``, or the whole global batches in one
  pass over the training cases, floor(cases / global batch) and at least 1 (the input
  pipeline drops the remainder). The one definition: the schedule, the loop and the loader
  use it."""
  if config.train.steps_per_epoch:
    return int(config.train.steps_per_epoch)
  if not num_train_cases:
    raise ValueError('config.train.steps_per_epoch is unset and the number of training cases '
                     'is unknown')
  if global_batch_size is None:
    global_batch_size = config.train.batch_size_per_device * jax.device_count()
  return max(1, int(num_train_cases) // int(global_batch_size))


def learning_rate_schedule(config, steps_per_epoch):
  """Poly decay per epoch: lr (1 - epoch / epochs)^power with epoch = step // steps_per_epoch."""
  train_cfg = config.train

  def schedule(count):
    epoch = jnp.minimum(count // steps_per_epoch, train_cfg.epochs)
    return train_cfg.learning_rate * (1.0 - epoch / train_cfg.epochs) ** train_cfg.poly_power
  return schedule


def teacher_is_frozen(config):
  """True when ``train.frozen_teacher`` names weights the teacher keeps (offline distillation)."""
  return bool(config.train.get('frozen_teacher'))


def network_optimizer(config, steps_per_epoch):
  """Adam(b1, b2) with L2 decay added to the gradient (PyTorch's Adam) and poly decay, over
  {'teacher', 'student'}; with a frozen teacher the teacher's updates are zero (and it has no
  Adam moments)."""
  train_cfg = config.train
  adam = optax.chain(
      optax.add_decayed_weights(train_cfg.weight_decay),
      optax.scale_by_adam(b1=train_cfg.b1, b2=train_cfg.b2, eps=1e-8),
      optax.scale_by_learning_rate(learning_rate_schedule(config, steps_per_epoch)))
  if not teacher_is_frozen(config):
    return adam

  def labels(params):
    return {name: jax.tree.map(lambda _: 'frozen' if name == 'teacher' else 'trained', tree)
            for name, tree in params.items()}
  return optax.multi_transform({'trained': adam, 'frozen': optax.set_to_zero()}, labels)


def discriminator_optimizer(config):
  train_cfg = config.train
  return optax.adam(train_cfg.disc_learning_rate, b1=train_cfg.disc_b1, b2=train_cfg.disc_b2,
                    eps=1e-8)
