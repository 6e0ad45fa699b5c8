"""Every loss of docs/method.md ("Losses"), one pure function each, and the weighted total.

Notation: f = teacher (all four modalities), m = student (a subset); p = sigmoid probabilities,
l = logits, y = per-channel one-hot targets, all channels-last (N, H, W, D, C). Every mean and
sum runs over the whole (global) batch, so results do not depend on how the batch is sharded.
"""

from typing import Dict, Sequence

import jax
import jax.numpy as jnp

_EPS = 1e-7


def _mse(a, b):
  """mean((a - b)^2) in float32."""
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def soft_dice_per_channel(p, y):
  """1 - 2 sum(p y) / (sum(p^2) + sum(y^2) + 1e-7) per channel, sums over N, H, W, D.

  p, y: (N, H, W, D, C). Returns (C,).
  """
  p = p.astype(jnp.float32)
  y = y.astype(jnp.float32)
  axes = tuple(range(p.ndim - 1))
  inter = jnp.sum(p * y, axes)
  denom = jnp.sum(p * p, axes) + jnp.sum(y * y, axes) + _EPS
  return 1.0 - 2.0 * inter / denom


def dice_loss(p, y):
  """Soft Dice summed over the C channels (a scalar in [0, C])."""
  return jnp.sum(soft_dice_per_channel(p, y))


def region_probs(p):
  """Soft WT / TC / ET from the (N, H, W, D, C >= 3) channels NETC, SNFH, ET (independent
  sigmoids) as soft unions: WT = 1 - (1-p0)(1-p1)(1-p2), TC = 1 - (1-p0)(1-p2), ET = p2; on
  0/1 inputs exactly the regions of ``metrics.region_masks``. Returns (N, H, W, D, 3)."""
  p = p.astype(jnp.float32)
  netc, snfh, et = p[..., 0], p[..., 1], p[..., 2]
  wt = 1.0 - (1.0 - netc) * (1.0 - snfh) * (1.0 - et)
  tc = 1.0 - (1.0 - netc) * (1.0 - et)
  return jnp.stack([wt, tc, et], axis=-1)


def region_dice_per_sample(p, y):
  """Soft Dice loss of WT / TC / ET per sample: 1 - 2 sum(r_p r_y) / (sum r_p^2 + sum r_y^2
  + 1e-7), sums over H, W, D, with r = ``region_probs``. p, y: (N, H, W, D, C). Returns (N, 3)."""
  rp, ry = region_probs(p), region_probs(y)
  axes = tuple(range(1, rp.ndim - 1))
  inter = jnp.sum(rp * ry, axes)
  denom = jnp.sum(rp * rp, axes) + jnp.sum(ry * ry, axes) + _EPS
  return 1.0 - 2.0 * inter / denom


def superset_consistency_loss(p_large, p_small, y):
  """Penalises a prediction from more modalities that is worse than one from fewer:
  mean over samples of sum over regions of max(0, L_r(p_large) - sg(L_r(p_small))), L_r the
  region Dice loss of ``region_dice_per_sample``. Only ``p_large`` receives a gradient (the
  smaller input's score is the bar to reach, not something to lower)."""
  large = region_dice_per_sample(p_large, y)
  small = jax.lax.stop_gradient(region_dice_per_sample(p_small, y))
  return jnp.mean(jnp.sum(jax.nn.relu(large - small), axis=-1))


def extreme_value_loss(attn_f: Sequence[jax.Array], attn_m: Sequence[jax.Array]):
  """L_EVD: extreme-value distillation of the kept attention maps.

  For each network stack its L kept maps A_i (each (N, heads, T, T)) into (L, N, heads, T, T)
  and take E in {max, min, mean} over the layer axis. Then
  L_EVD = sum_{E} sum_{i} mean((A_i^f * E^f - A_i^m * E^m)^2)   (3 x L terms).
  """
  a_f = jnp.stack([a.astype(jnp.float32) for a in attn_f])
  a_m = jnp.stack([a.astype(jnp.float32) for a in attn_m])
  total = 0.0
  for reduce in (jnp.max, jnp.min, jnp.mean):
    e_f, e_m = reduce(a_f, axis=0), reduce(a_m, axis=0)
    # mean over (N, heads, T, T) of each layer, summed over layers.
    total += jnp.sum(jnp.mean(jnp.square(a_f * e_f - a_m * e_m), axis=(1, 2, 3, 4)))
  return total


def feature_loss(feats_f: Sequence[jax.Array], feats_m: Sequence[jax.Array]):
  """L_MST = sum_k mean((z_k'^f - z_k'^m)^2) over the decoded maps z3', z6', z9', z12'."""
  return sum(_mse(a, b) for a, b in zip(feats_f, feats_m))


def agreement_weight(epoch, max_weight=10.0, rampup_epochs=20.0):
  """Ramp-up 10 exp(-5 (1 - min(epoch, R) / R)^2) (1 when R is 0 times max_weight)."""
  if rampup_epochs <= 0:
    return jnp.asarray(max_weight, jnp.float32)
  phase = 1.0 - jnp.clip(jnp.asarray(epoch, jnp.float32), 0.0, rampup_epochs) / rampup_epochs
  return max_weight * jnp.exp(-5.0 * phase * phase)


def agreement_loss(a_f, a_m):
  """L_mse: sum over channels c of mean over (N, H, W, D) of (a_f[..., c] - a_m[..., c])^2.

  Applied to sigmoid probabilities (authors) or to logits (paper), both (N, H, W, D, C).
  """
  diff = jnp.square(a_f.astype(jnp.float32) - a_m.astype(jnp.float32))
  return jnp.sum(jnp.mean(diff, axis=tuple(range(diff.ndim - 1))))


def standardize(logits, axis=-1):
  """Z-score over the class axis: (l - mean) / (std + 1e-7), std with Bessel's correction
  (as PyTorch's ``Tensor.std``)."""
  logits = logits.astype(jnp.float32)
  mean = jnp.mean(logits, axis=axis, keepdims=True)
  std = jnp.std(logits, axis=axis, keepdims=True, ddof=1)
  return (logits - mean) / (std + _EPS)


def standardized_kl_loss(l_f, l_m, temperature=7.0):
  """L_KL: logit-standardised KD (Sun et al., CVPR 2024) over the class axis.

  q_f = softmax(z(l_f) / tau), q_m = softmax(z(l_m) / tau) per voxel;
  L_KL = tau^2 * sum_{voxels, classes} q_f (log q_f - log q_m) / (N H W D C).
  """
  lf = standardize(l_f) / temperature
  lm = standardize(l_m) / temperature
  log_q_f = jax.nn.log_softmax(lf, axis=-1)
  log_q_m = jax.nn.log_softmax(lm, axis=-1)
  kl = jnp.sum(jnp.exp(log_q_f) * (log_q_f - log_q_m))
  return kl * temperature ** 2 / l_f.size


def bce_with_logits(logits, label: float):
  """mean over samples of BCE(sigmoid(logits), label) for a constant label 0 or 1."""
  logits = logits.astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(logits) - label * logits)


def discriminator_loss(d_logits_f, d_logits_m):
  """The discriminator's own loss: BCE(D(s_f), 0) + BCE(D(s_m), 1) (teacher 0, student 1)."""
  return bce_with_logits(d_logits_f, 0.0) + bce_with_logits(d_logits_m, 1.0)


def adversarial_loss(d_logits_m):
  """L_adv: the student's style should look like the teacher's: BCE(D(s_m), 0)."""
  return bce_with_logits(d_logits_m, 0.0)


def mix_matrix(a, b):
  """M = A B^T / (N C H W D) with A, B: (N, H, W, D, C) reshaped to (N C, H W D)."""
  n, c = a.shape[0], a.shape[-1]
  flat = lambda t: jnp.moveaxis(t.astype(jnp.float32), -1, 1).reshape(n * c, -1)
  return flat(a) @ flat(b).T / a.size


# The (G_a, G_b) pairs of the style matching term over G = [c3d, style, content].
STYLE_PAIRS = ((0, 2), (1, 0), (2, 1))


def style_matching_loss(g_f: Sequence[jax.Array], g_m: Sequence[jax.Array], scale=1e-4):
  """L_style = scale * sum_{(a,b)} sum((M_ab^f - M_ab^m)^2) / (4 C^2 (H W)^2).

  g_f, g_m: [c3d, style, content], each (N, H, W, D, C); M_ab = mix_matrix(G_a, G_b).
  """
  _, h, w, _, c = g_f[0].shape
  total = 0.0
  for a, b in STYLE_PAIRS:
    diff = mix_matrix(g_f[a], g_f[b]) - mix_matrix(g_m[a], g_m[b])
    total += jnp.sum(jnp.square(diff)) / (4.0 * c ** 2 * (h * w) ** 2)
  return scale * total


def content_loss(content_f, content_m):
  """L_content = mean((content_f - content_m)^2)."""
  return _mse(content_f, content_m)


def distillation_scale(epoch, delay_epochs=0.0, ramp_epochs=0.0):
  """r(epoch) in [0, 1]: 0 for the first ``delay_epochs``, then linear up to 1 over
  ``ramp_epochs`` (a teacher warm-up; 1 throughout with both 0, the paper's recipe)."""
  e = jnp.asarray(epoch, jnp.float32) - delay_epochs
  if ramp_epochs <= 0:
    return jnp.where(e >= 0, 1.0, 0.0).astype(jnp.float32)
  return jnp.clip(e / ramp_epochs, 0.0, 1.0)


def total_loss(out_f, out_m, y, d_logits_m, epoch, cfg, neighbour=None) -> Dict[str, jax.Array]:
  """The network objective and its terms.

  L = L_dice + r(epoch) [lambda1 (alpha L_EVD + beta L_MST) + lambda2 (w(epoch) L_mse + L_KL)
      + lambda3 (epsilon L_adv + theta L_style) + content_weight L_content]
      + superset_weight L_superset,
  r = ``distillation_scale`` (1 unless ``cfg.distill_delay_epochs`` / ``distill_ramp_epochs``).
  L_superset (not in the paper; ``cfg.superset_weight``, 0 by default) needs ``neighbour`` =
  (student probabilities on a subset one modality away from the student's, is_superset (N,)):
  ``superset_consistency_loss`` with the larger of the two inputs as ``p_large``.

  out_f, out_m: NetworkOutputs of teacher and student; y: (N, H, W, D, C) targets;
  d_logits_m: the discriminator's logits on the student's style map (or None when
  lambda3 = 0); cfg: ``config.loss``. With ``cfg.stop_gradient_teacher`` the teacher's tensors
  enter every distillation term as constants. Returns a dict with 'total' and every term.
  """
  sg = jax.lax.stop_gradient if cfg.stop_gradient_teacher else (lambda t: t)
  terms = {}
  terms['dice_teacher'] = dice_loss(out_f.probs, y)
  terms['dice_student'] = dice_loss(out_m.probs, y)
  terms['dice'] = ((1.0 - cfg.missing_weight) * terms['dice_teacher']
                   + cfg.missing_weight * terms['dice_student'])

  if cfg.lambda_mstkd:
    terms['evd'] = extreme_value_loss([sg(a) for a in out_f.attention], out_m.attention)
    terms['mst'] = feature_loss([sg(z) for z in out_f.features], out_m.features)
    terms['mstkd'] = cfg.evd_alpha * terms['evd'] + cfg.mst_beta * terms['mst']

  if cfg.lambda_logit:
    if cfg.agreement_on == 'probabilities':
      terms['agreement'] = agreement_loss(sg(out_f.probs), out_m.probs)
    elif cfg.agreement_on == 'logits':
      terms['agreement'] = agreement_loss(sg(out_f.logits), out_m.logits)
    else:
      raise ValueError(f"loss.agreement_on must be 'probabilities' or 'logits', "
                       f'got {cfg.agreement_on!r}')
    terms['agreement_weight'] = agreement_weight(epoch, cfg.agreement_max_weight,
                                             cfg.agreement_rampup_epochs)
    terms['kl'] = standardized_kl_loss(sg(out_f.logits), out_m.logits, cfg.kl_temperature)
    terms['logit'] = terms['agreement_weight'] * terms['agreement'] + terms['kl']

  if cfg.lambda_gsme:
    terms['adv'] = adversarial_loss(d_logits_m)
    g_f = [sg(out_f.c3d), sg(out_f.style), sg(out_f.content)]
    g_m = [out_m.c3d, out_m.style, out_m.content]
    terms['style'] = style_matching_loss(g_f, g_m, cfg.style_scale)
    terms['gsme'] = cfg.adv_epsilon * terms['adv'] + cfg.style_theta * terms['style']

  if cfg.content_weight:
    terms['content'] = content_loss(sg(out_f.content), out_m.content)

  if cfg.get('superset_weight', 0.0):
    if neighbour is None:
      raise ValueError('loss.superset_weight needs the student on a neighbouring subset')
    p_nb, is_superset = neighbour
    pick = lambda a, b: jnp.where(is_superset[:, None, None, None, None], a, b)
    terms['superset'] = superset_consistency_loss(pick(p_nb, out_m.probs),
                                                  pick(out_m.probs, p_nb), y)

  if cfg.get('distill_delay_epochs', 0.0) or cfg.get('distill_ramp_epochs', 0.0):
    terms['distill_scale'] = distillation_scale(epoch, cfg.get('distill_delay_epochs', 0.0),
                                                cfg.get('distill_ramp_epochs', 0.0))
  terms['total'] = sum(weighted_terms(terms, cfg).values())
  return terms


def weighted_terms(terms, cfg) -> Dict[str, jax.Array]:
  """{term: its share of the total loss} for the ``terms`` of ``total_loss``: the total is
  their sum. The teacher's and the student's Dice weighted by 1 - w_m and w_m; each
  distillation term times its lambda, its inner weight and r(epoch) (``terms['distill_scale']``,
  1 when absent)."""
  r = terms.get('distill_scale', 1.0)
  parts = {'dice_teacher': (1.0 - cfg.missing_weight) * terms['dice_teacher'],
           'dice_student': cfg.missing_weight * terms['dice_student']}
  if cfg.lambda_mstkd:
    parts['evd'] = r * cfg.lambda_mstkd * cfg.evd_alpha * terms['evd']
    parts['mst'] = r * cfg.lambda_mstkd * cfg.mst_beta * terms['mst']
  if cfg.lambda_logit:
    parts['agreement'] = r * cfg.lambda_logit * terms['agreement_weight'] * terms['agreement']
    parts['kl'] = r * cfg.lambda_logit * terms['kl']
  if cfg.lambda_gsme:
    parts['adv'] = r * cfg.lambda_gsme * cfg.adv_epsilon * terms['adv']
    parts['style'] = r * cfg.lambda_gsme * cfg.style_theta * terms['style']
  if cfg.content_weight:
    parts['content'] = r * cfg.content_weight * terms['content']
  if cfg.get('superset_weight', 0.0):          # not distillation: r does not scale it
    parts['superset'] = cfg.superset_weight * terms['superset']
  return parts
