"""The train state and the compiled training step (teacher, student, losses, discriminator).

One step, one XLA program:
  1. draw a modality subset per sample from the step's key and zero the absent channels;
  2. teacher forward on the full input, student forward on the masked input (BatchNorm in
     training mode, dropout on), the discriminator on the student's style map;
  3. every loss of SPEC section 4 and one backward pass for teacher + student together;
  4. Adam (+ L2 added to the gradient, poly learning-rate decay) on teacher + student;
  5. the discriminator's own Adam step on BCE(D(s_f), 0) + BCE(D(s_m), 1), style maps frozen.
The step returns the new state and a dict of measurements (every loss term, norms, lr).
"""

import contextlib
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mstkd_jax import losses
from mstkd_jax.models.discriminator import StyleDiscriminator
from mstkd_jax.models.mstkdnet import network_from_config
from mstkd_jax.subsets import parse_subset, subset_masks


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  params / batch_stats: {'teacher': ..., 'student': ...}; opt_state: the networks' Adam;
  disc_params / disc_opt_state: the style discriminator and its own Adam.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any


def steps_per_epoch(config, num_train_cases=None):
  """config.train.steps_per_epoch, or ceil(cases / global batch)."""
  if config.train.steps_per_epoch:
    return int(config.train.steps_per_epoch)
  if not num_train_cases:
    raise ValueError('config.train.steps_per_epoch is unset and the number of training cases '
                     'is unknown')
  global_batch = config.train.batch_size_per_device * jax.device_count()
  return max(1, -(-num_train_cases // global_batch))


def learning_rate_schedule(config, spe):
  """Poly decay per epoch: lr (1 - epoch / epochs)^power with epoch = step // spe."""
  t = config.train

  def schedule(count):
    epoch = jnp.minimum(count // spe, t.epochs)
    return t.learning_rate * (1.0 - epoch / t.epochs) ** t.poly_power
  return schedule


def network_optimizer(config, spe):
  """Adam(b1, b2) with L2 decay added to the gradient (PyTorch's Adam) and poly decay."""
  t = config.train
  return optax.chain(
      optax.add_decayed_weights(t.weight_decay),
      optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=1e-8),
      optax.scale_by_learning_rate(learning_rate_schedule(config, spe)))


def discriminator_optimizer(config):
  t = config.train
  return optax.adam(t.disc_learning_rate, b1=t.disc_b1, b2=t.disc_b2, eps=1e-8)


def discriminator_from_config(config):
  return StyleDiscriminator(tuple(config.discriminator.channels))


def input_shape(config, batch=1):
  return (batch,) + tuple(config.data.input_shape) + (config.model.in_channels,)


def _initialisation_rng():
  """The random-bit generator of parameter initialisation: threefry in its non-partitionable
  form, which XLA:CPU compiles about 3x faster (the initialisation program of the tiny
  config: 22 s against 65 s; experiments/RESULTS_speed.md). Initialisation runs on one device,
  so the partitionable form buys nothing there; dropout in the step keeps jax's default."""
  switch = getattr(jax, 'threefry_partitionable', None)
  return switch(False) if switch is not None else contextlib.nullcontext()


def init_state(config, rng, spe) -> TrainState:
  """Fresh parameters for teacher, student and discriminator (run it under jax.jit)."""
  with _initialisation_rng():
    return _init_state(config, rng, spe)


def _init_state(config, rng, spe) -> TrainState:
  net = network_from_config(config)
  disc = discriminator_from_config(config)
  k_t, k_s, k_d = jax.random.split(rng, 3)
  x = jnp.zeros(input_shape(config), jnp.float32)
  v_t = net.init({'params': k_t, 'dropout': k_t}, x, train=False)
  v_s = net.init({'params': k_s, 'dropout': k_s}, x, train=False)
  style = jax.eval_shape(lambda v: net.apply(v, x, train=False).style, v_t)
  d_params = disc.init(k_d, jnp.zeros(style.shape, jnp.float32))
  params = {'teacher': v_t['params'], 'student': v_s['params']}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats={'teacher': v_t['batch_stats'], 'student': v_s['batch_stats']},
      opt_state=network_optimizer(config, spe).init(params),
      disc_params=d_params,
      disc_opt_state=discriminator_optimizer(config).init(d_params))


def abstract_state(config, spe) -> TrainState:
  """Shapes and dtypes of the state, without computing anything."""
  return jax.eval_shape(functools.partial(init_state, config, spe=spe), jax.random.key(0))


def allowed_subsets(config):
  """(S, 4) float32 masks of the modality subsets the student may see."""
  subsets = [parse_subset(s) for s in config.train.subsets] if config.train.subsets else None
  return subset_masks(subsets)


def draw_modality_masks(rng, batch_size, masks):
  """One subset per sample, uniformly among the rows of ``masks``: (N, 4) float32."""
  idx = jax.random.randint(rng, (batch_size,), 0, masks.shape[0])
  return jnp.asarray(masks)[idx]


def apply_masks(image, masks):
  """Zeroes the absent modalities: image (N, H, W, D, C) * masks (N, C)."""
  return image * masks[:, None, None, None, :].astype(image.dtype)


def _global_norm(tree):
  return optax.tree.norm(tree)


def network_objective(params, batch_stats, disc_params, image, image_m, label, keys, epoch,
                      config):
  """The teacher + student objective of one step (SPEC section 4).

  params / batch_stats: {'teacher', 'student'}; image: full input, image_m: the student's
  masked input, both (N, H, W, D, 4); label (N, H, W, D, 4); keys: (teacher, student) dropout
  keys. The discriminator enters only through the adversarial term and is not differentiated
  here. Returns (total, (terms, new batch_stats, teacher style, student style)).
  """
  net = network_from_config(config)
  cfg = config.loss

  def forward(name, x, key):
    with jax.named_scope(name):
      out, updates = net.apply({'params': params[name], 'batch_stats': batch_stats[name]}, x,
                               train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    return out, updates['batch_stats']

  out_t, bs_t = forward('teacher', image, keys[0])
  out_s, bs_s = forward('student', image_m, keys[1])
  d_logits_m = None
  if cfg.lambda_gsme:
    with jax.named_scope('discriminator_on_student'):
      d_logits_m = discriminator_from_config(config).apply(disc_params, out_s.style)
  with jax.named_scope('losses'):
    terms = losses.total_loss(out_t, out_s, label, d_logits_m, epoch, cfg)
  aux = (terms, {'teacher': bs_t, 'student': bs_s}, out_t.style, out_s.style)
  return terms['total'], aux


def train_step(state: TrainState, batch, rng, *, config, spe):
  """One update of teacher, student and discriminator. Returns (new_state, metrics)."""
  disc = discriminator_from_config(config)
  use_disc = bool(config.loss.lambda_gsme)
  rng = jax.random.fold_in(rng, state.step)
  k_mask, k_t, k_s = jax.random.split(rng, 3)
  image = batch['image'].astype(jnp.float32)
  label = batch['label'].astype(jnp.float32)
  modality = draw_modality_masks(k_mask, image.shape[0], allowed_subsets(config))
  image_m = apply_masks(image, modality)
  epoch = state.step // spe

  objective = functools.partial(network_objective, batch_stats=state.batch_stats,
                                disc_params=state.disc_params, image=image, image_m=image_m,
                                label=label, keys=(k_t, k_s), epoch=epoch, config=config)
  grads, (terms, new_stats, style_t, style_s) = jax.grad(objective, has_aux=True)(state.params)
  tx = network_optimizer(config, spe)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  metrics = dict(terms)
  disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
  if use_disc:
    style_t = jax.lax.stop_gradient(style_t)
    style_s = jax.lax.stop_gradient(style_s)

    def disc_objective(dp):
      with jax.named_scope('discriminator'):
        return losses.discriminator_loss(disc.apply(dp, style_t), disc.apply(dp, style_s))

    d_loss, d_grads = jax.value_and_grad(disc_objective)(state.disc_params)
    d_updates, disc_opt_state = discriminator_optimizer(config).update(
        d_grads, state.disc_opt_state, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)
    metrics['disc'] = d_loss
    metrics['disc_grad_norm'] = _global_norm(d_grads)

  metrics['grad_norm_teacher'] = _global_norm(grads['teacher'])
  metrics['grad_norm_student'] = _global_norm(grads['student'])
  metrics['param_norm_teacher'] = _global_norm(params['teacher'])
  metrics['param_norm_student'] = _global_norm(params['student'])
  metrics['learning_rate'] = learning_rate_schedule(config, spe)(state.step)
  metrics['epoch'] = epoch
  finite = jnp.isfinite(terms['total']) & jnp.isfinite(metrics['grad_norm_teacher']) & \
      jnp.isfinite(metrics['grad_norm_student'])
  metrics['finite'] = finite

  new_state = TrainState(step=state.step + 1, params=params, batch_stats=new_stats,
                         opt_state=opt_state, disc_params=disc_params,
                         disc_opt_state=disc_opt_state)
  if config.train.nan_policy == 'skip':
    keep_old = lambda new, old: jnp.where(finite, new, old)
    new_state = jax.tree.map(keep_old, new_state, state.replace(step=state.step + 1))
  return new_state, metrics


def predict_probs(params, batch_stats, image, *, config):
  """Evaluation forward of one network: sigmoid probabilities (N, H, W, D, C)."""
  net = network_from_config(config)
  return net.apply({'params': params, 'batch_stats': batch_stats}, image, train=False).probs


def count_params(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
