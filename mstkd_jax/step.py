"""The compiled training step (teacher, student, losses, discriminator) and its schedule.

One step, one XLA program:
  1. draw a modality subset per sample from the step's key and zero the absent channels
     (``modalities.draw_masks``; ``train.subset_weighting``);
  2. teacher forward on the full input, student forward on the masked input (BatchNorm in
     training mode, dropout on), the discriminator on the student's style map; with
     ``loss.superset_weight`` a second student forward on a subset one modality away
     (``modalities.neighbour_masks``; its BatchNorm statistics are not kept);
  3. every loss of docs/method.md ("Losses") and one backward pass for teacher + student together;
  4. Adam (+ L2 added to the gradient, poly learning-rate decay) on teacher + student;
  5. the discriminator's own Adam step on BCE(D(s_f), 0) + BCE(D(s_m), 1), style maps frozen.
The step returns the new state and a dict of measurements (every loss term, norms, lr).
The state, the networks and the optimisers come from ``models.build`` and ``optim``.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from mstkd_jax import losses, modalities, optim
from mstkd_jax.models.build import (TrainState, discriminator_from_config,
                                    network_from_config)


def allowed_subsets(config):
  """(S, 4) float32 masks of the modality subsets the student may see (``train.subsets``)."""
  return modalities.subset_masks(modalities.parse_subsets(config.train.subsets or None))


def subset_probabilities(config):
  """(S,) sampling probabilities of ``allowed_subsets`` (``train.subset_weighting``), or None
  for uniform draws."""
  weighting = config.train.get('subset_weighting', 'uniform') or 'uniform'
  return modalities.subset_probabilities(allowed_subsets(config), weighting)


def _global_norm(tree):
  return optax.tree.norm(tree)


def network_objective(params, batch_stats, disc_params, image, image_m, label, keys, epoch,
                      config, neighbour=None):
  """The teacher + student objective of one step (docs/method.md, "Losses").

  params / batch_stats: {'teacher', 'student'}; image: full input, image_m: the student's
  masked input, both (N, H, W, D, 4); label (N, H, W, D, 4); keys: (teacher, student) dropout
  keys. The discriminator enters only through the adversarial term and is not differentiated
  here. ``neighbour``: (image_nb, is_superset), the input one modality away from image_m and
  whether it has one more (``loss.superset_weight`` only). Returns (total, (terms, new
  batch_stats, teacher style, student style)).
  """
  net = network_from_config(config)
  cfg = config.loss
  if optim.teacher_is_frozen(config):   # no gradient (and no backward pass) into the teacher
    params = {**params, 'teacher': jax.lax.stop_gradient(params['teacher'])}

  def forward(scope, x, key):
    name = scope.split('_')[0]
    with jax.named_scope(scope):
      out, updates = net.apply({'params': params[name], 'batch_stats': batch_stats[name]}, x,
                               train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    return out, updates['batch_stats']

  out_t, bs_t = forward('teacher', image, keys[0])
  out_s, bs_s = forward('student', image_m, keys[1])
  student_nb = None
  if neighbour is not None:
    image_nb, is_superset = neighbour
    out_nb, _ = forward('student_neighbour', image_nb, jax.random.fold_in(keys[1], 1))
    student_nb = (out_nb.probs, is_superset)
  d_logits_m = None
  if cfg.lambda_gsme:
    with jax.named_scope('discriminator_on_student'):
      d_logits_m = discriminator_from_config(config).apply(disc_params, out_s.style)
  with jax.named_scope('losses'):
    terms = losses.total_loss(out_t, out_s, label, d_logits_m, epoch, cfg, student_nb)
  aux = (terms, {'teacher': bs_t, 'student': bs_s}, out_t.style, out_s.style)
  return terms['total'], aux


def train_step(state: TrainState, batch, rng, *, config, steps_per_epoch):
  """One update of teacher, student and discriminator. Returns (new_state, metrics)."""
  disc = discriminator_from_config(config)
  use_disc = bool(config.loss.lambda_gsme)
  rng = jax.random.fold_in(rng, state.step)
  k_mask, k_t, k_s = jax.random.split(rng, 3)
  image = batch['image'].astype(jnp.float32)
  label = batch['label'].astype(jnp.float32)
  modality = modalities.draw_masks(k_mask, image.shape[0], allowed_subsets(config),
                                   subset_probabilities(config))
  image_m = modalities.apply_masks(image, modality)
  epoch = state.step // steps_per_epoch
  neighbour = None
  if config.loss.get('superset_weight', 0.0):
    nb_masks, is_superset = modalities.neighbour_masks(jax.random.fold_in(k_mask, 1), modality)
    neighbour = (modalities.apply_masks(image, nb_masks), is_superset)

  objective = functools.partial(network_objective, batch_stats=state.batch_stats,
                                disc_params=state.disc_params, image=image, image_m=image_m,
                                label=label, keys=(k_t, k_s), epoch=epoch, config=config,
                                neighbour=neighbour)
  grads, (terms, new_stats, style_t, style_s) = jax.grad(objective, has_aux=True)(state.params)
  tx = optim.network_optimizer(config, steps_per_epoch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  if optim.teacher_is_frozen(config):   # it keeps its running statistics too
    new_stats = {**new_stats, 'teacher': state.batch_stats['teacher']}

  metrics = dict(terms)
  disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
  if use_disc:
    style_t = jax.lax.stop_gradient(style_t)
    style_s = jax.lax.stop_gradient(style_s)

    def disc_objective(dp):
      with jax.named_scope('discriminator'):
        return losses.discriminator_loss(disc.apply(dp, style_t), disc.apply(dp, style_s))

    d_loss, d_grads = jax.value_and_grad(disc_objective)(state.disc_params)
    d_updates, disc_opt_state = optim.discriminator_optimizer(config).update(
        d_grads, state.disc_opt_state, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)
    metrics['disc'] = d_loss
    metrics['disc_grad_norm'] = _global_norm(d_grads)

  metrics['grad_norm_teacher'] = _global_norm(grads['teacher'])
  metrics['grad_norm_student'] = _global_norm(grads['student'])
  metrics['param_norm_teacher'] = _global_norm(params['teacher'])
  metrics['param_norm_student'] = _global_norm(params['student'])
  metrics['learning_rate'] = optim.learning_rate_schedule(config, steps_per_epoch)(state.step)
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
