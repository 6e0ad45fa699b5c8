"""Each loss against a hand-written NumPy version of its formula (docs/method.md, "Losses")."""

import numpy as np
import pytest
import jax.numpy as jnp
from ml_collections import config_dict

from mstkd_jax import losses
from mstkd_jax.models.mstkdnet import NetworkOutputs

RS = np.random.RandomState(0)
TOL = dict(rtol=2e-5, atol=1e-7)


def rand(*shape):
  return RS.randn(*shape).astype(np.float32)


def np_dice(p, y):
  axes = tuple(range(p.ndim - 1))
  per = 1 - 2 * (p * y).sum(axes) / ((p ** 2).sum(axes) + (y ** 2).sum(axes) + 1e-7)
  return per.sum()


def test_soft_dice_matches_numpy():
  p = RS.rand(2, 5, 6, 4, 4).astype(np.float32)
  y = (RS.rand(2, 5, 6, 4, 4) > 0.7).astype(np.float32)
  np.testing.assert_allclose(losses.dice_loss(p, y), np_dice(p, y), **TOL)


def test_soft_dice_edge_cases():
  y = np.zeros((1, 4, 4, 4, 4), np.float32)
  # all-zero prediction and all-zero target: 1 - 0 / eps = 1 per channel, never NaN.
  np.testing.assert_allclose(losses.dice_loss(y, y), 4.0)
  # perfect prediction of a non-empty target: 0 (up to eps).
  y[..., 0, 0, 0, :] = 1
  np.testing.assert_allclose(losses.dice_loss(y, y), 0.0, atol=1e-6)


def np_evd(af, am):
  af, am = np.stack(af), np.stack(am)
  total = 0.0
  for red in (np.max, np.min, np.mean):
    ef, em = red(af, 0), red(am, 0)
    for i in range(af.shape[0]):
      total += np.mean((af[i] * ef - am[i] * em) ** 2)
  return total


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def test_extreme_value_loss_matches_numpy():
  af = [softmax(rand(2, 3, 7, 7)) for _ in range(4)]
  am = [softmax(rand(2, 3, 7, 7)) for _ in range(4)]
  np.testing.assert_allclose(losses.extreme_value_loss(af, am), np_evd(af, am), rtol=1e-5)
  np.testing.assert_allclose(losses.extreme_value_loss(af, af), 0.0)


def test_feature_loss_matches_numpy():
  ff = [rand(2, 4, 4, 4, 3), rand(2, 8, 8, 8, 2)]
  fm = [rand(2, 4, 4, 4, 3), rand(2, 8, 8, 8, 2)]
  want = sum(np.mean((a - b) ** 2) for a, b in zip(ff, fm))
  np.testing.assert_allclose(losses.feature_loss(ff, fm), want, rtol=1e-5)
  np.testing.assert_allclose(losses.feature_loss(ff, ff), 0.0)


def test_agreement_loss_and_rampup():
  a, b = rand(2, 3, 4, 5, 4), rand(2, 3, 4, 5, 4)
  want = sum(np.mean((a[..., c] - b[..., c]) ** 2) for c in range(4))
  np.testing.assert_allclose(losses.agreement_loss(a, b), want, rtol=1e-5)
  for epoch in (0, 5, 20, 40):
    ramp = 10 * np.exp(-5 * (1 - min(epoch, 20) / 20) ** 2)
    np.testing.assert_allclose(losses.agreement_weight(epoch), ramp, rtol=1e-6)


def np_standardized_kl(lf, lm, tau):
  def z(l):
    return (l - l.mean(-1, keepdims=True)) / (l.std(-1, ddof=1, keepdims=True) + 1e-7)
  qf, qm = softmax(z(lf) / tau), softmax(z(lm) / tau)
  return (qf * (np.log(qf) - np.log(qm))).sum() * tau ** 2 / lf.size


def test_standardized_kl_matches_numpy():
  lf, lm = rand(2, 3, 4, 5, 4) * 3, rand(2, 3, 4, 5, 4)
  np.testing.assert_allclose(losses.standardized_kl_loss(lf, lm, 7.0),
                             np_standardized_kl(lf, lm, 7.0), rtol=1e-4)
  # identical teacher and student -> 0; invariant to per-voxel shift and scale of logits.
  np.testing.assert_allclose(losses.standardized_kl_loss(lf, lf), 0.0, atol=1e-9)
  np.testing.assert_allclose(losses.standardized_kl_loss(lf, 3 * lf + 1.5), 0.0, atol=1e-7)


def np_bce(logits, label):
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  return np.mean(-(label * np.log(p) + (1 - label) * np.log(1 - p)))


def test_adversarial_and_discriminator_losses():
  df, dm = rand(5), rand(5)
  np.testing.assert_allclose(losses.adversarial_loss(dm), np_bce(dm, 0.0), rtol=1e-5)
  np.testing.assert_allclose(losses.discriminator_loss(df, dm),
                             np_bce(df, 0.0) + np_bce(dm, 1.0), rtol=1e-5)


def np_style(gf, gm, scale):
  n, h, w, d, c = gf[0].shape
  def mix(a, b):
    fa = np.moveaxis(a, -1, 1).reshape(n * c, -1)
    fb = np.moveaxis(b, -1, 1).reshape(n * c, -1)
    return fa @ fb.T / a.size
  total = 0.0
  for a, b in ((0, 2), (1, 0), (2, 1)):
    total += ((mix(gf[a], gf[b]) - mix(gm[a], gm[b])) ** 2).sum() / (4 * c ** 2 * (h * w) ** 2)
  return scale * total


def test_style_matching_matches_numpy():
  gf = [rand(2, 3, 4, 2, 5) for _ in range(3)]
  gm = [rand(2, 3, 4, 2, 5) for _ in range(3)]
  np.testing.assert_allclose(losses.style_matching_loss(gf, gm, 1e-4),
                             np_style(gf, gm, 1e-4), rtol=1e-4)
  np.testing.assert_allclose(losses.style_matching_loss(gf, gf), 0.0)


def test_content_loss():
  a, b = rand(2, 3, 3, 3, 4), rand(2, 3, 3, 3, 4)
  np.testing.assert_allclose(losses.content_loss(a, b), np.mean((a - b) ** 2), rtol=1e-5)


def fake_outputs(seed):
  rs = np.random.RandomState(seed)
  r = lambda *s: jnp.asarray(rs.randn(*s).astype(np.float32))
  logits = r(1, 8, 8, 8, 4)
  attn = [jnp.asarray(softmax(rs.randn(1, 2, 8, 8))) for _ in range(4)]
  return NetworkOutputs(logits=logits, probs=1 / (1 + jnp.exp(-logits)), style=r(1, 2, 2, 2, 6),
                        content=r(1, 2, 2, 2, 6), c3d=r(1, 2, 2, 2, 6), attention=attn,
                        features=[r(1, 2, 2, 2, 3), r(1, 4, 4, 4, 2)])


def test_total_loss_identical_networks_have_zero_distillation(tiny_config):
  out = fake_outputs(0)
  y = np.zeros((1, 8, 8, 8, 4), np.float32)
  terms = losses.total_loss(out, out, y, jnp.zeros(1), 3, tiny_config.loss)
  for k in ('evd', 'mst', 'agreement', 'kl', 'style', 'content'):
    np.testing.assert_allclose(terms[k], 0.0, atol=1e-9, err_msg=k)


def test_total_loss_weights_combine_terms(tiny_config):
  cfg = config_dict.ConfigDict(tiny_config.loss.to_dict())
  cfg.update(lambda_mstkd=0.5, lambda_logit=2.0, lambda_gsme=3.0, content_weight=0.7)
  f, m = fake_outputs(0), fake_outputs(1)
  y = (np.random.RandomState(2).rand(1, 8, 8, 8, 4) > 0.5).astype(np.float32)
  t = losses.total_loss(f, m, y, jnp.ones(1), 7, cfg)
  # L_dice = (1 - w_m) dice(p_f, y) + w_m dice(p_m, y), the weighted teacher and student terms.
  np.testing.assert_allclose(t['dice'], (1 - cfg.missing_weight) * np_dice(f.probs, y)
                             + cfg.missing_weight * np_dice(m.probs, y), **TOL)
  want = (t['dice'] + 0.5 * (cfg.evd_alpha * t['evd'] + cfg.mst_beta * t['mst'])
          + 2.0 * (t['agreement_weight'] * t['agreement'] + t['kl'])
          + 3.0 * (cfg.adv_epsilon * t['adv'] + cfg.style_theta * t['style'])
          + 0.7 * t['content'])
  np.testing.assert_allclose(t['total'], want, rtol=1e-6)
  # weighted_terms: each term's share of the total, one entry per term.
  parts = losses.weighted_terms(t, cfg)
  assert set(parts) == {'dice_teacher', 'dice_student', 'evd', 'mst', 'agreement', 'kl', 'adv',
                        'style', 'content'}
  np.testing.assert_allclose(parts['mst'], 0.5 * cfg.mst_beta * t['mst'], rtol=1e-6)
  np.testing.assert_allclose(parts['kl'], 2.0 * t['kl'], rtol=1e-6)
  np.testing.assert_allclose(parts['content'], 0.7 * t['content'], rtol=1e-6)
  # Ablations remove their terms from the total.
  cfg.update(lambda_mstkd=0.0, lambda_logit=0.0, lambda_gsme=0.0, content_weight=0.0)
  t = losses.total_loss(f, m, y, None, 7, cfg)
  assert set(t) == {'dice_teacher', 'dice_student', 'dice', 'total'}
  np.testing.assert_allclose(t['total'], t['dice'])


def test_agreement_on_logits_option(tiny_config):
  cfg = config_dict.ConfigDict(tiny_config.loss.to_dict())
  cfg.agreement_on = 'logits'
  f, m = fake_outputs(0), fake_outputs(1)
  y = np.zeros((1, 8, 8, 8, 4), np.float32)
  t = losses.total_loss(f, m, y, jnp.ones(1), 7, cfg)
  np.testing.assert_allclose(t['agreement'], losses.agreement_loss(f.logits, m.logits))
  cfg.agreement_on = 'probs'
  with pytest.raises(ValueError, match='agreement_on'):
    losses.total_loss(f, m, y, jnp.ones(1), 7, cfg)


def test_distillation_scale_delays_then_ramps():
  scale = lambda e, d, r: float(losses.distillation_scale(e, d, r))
  assert scale(0, 0.0, 0.0) == 1.0                     # the paper: always on
  assert scale(2, 3.0, 0.0) == 0.0 and scale(3, 3.0, 0.0) == 1.0
  assert scale(1, 2.0, 4.0) == 0.0
  assert scale(3, 2.0, 4.0) == 0.25
  assert scale(9, 2.0, 4.0) == 1.0


def test_teacher_warmup_scales_every_distillation_term(tiny_config):
  cfg = config_dict.ConfigDict(tiny_config.loss.to_dict())
  f, m = fake_outputs(0), fake_outputs(1)
  y = (np.random.RandomState(2).rand(1, 8, 8, 8, 4) > 0.5).astype(np.float32)
  plain = losses.total_loss(f, m, y, jnp.ones(1), 7, cfg)
  cfg.update(distill_delay_epochs=4.0, distill_ramp_epochs=4.0)
  during = losses.total_loss(f, m, y, jnp.ones(1), 2, cfg)
  np.testing.assert_allclose(during['total'], during['dice'])
  half = losses.total_loss(f, m, y, jnp.ones(1), 6, cfg)
  np.testing.assert_allclose(half['total'] - half['dice'],
                             0.5 * (losses.total_loss(f, m, y, jnp.ones(1), 6, tiny_config.loss)
                                    ['total'] - half['dice']), rtol=1e-5)
  np.testing.assert_allclose(losses.weighted_terms(half, cfg)['kl'],
                             0.5 * cfg.lambda_logit * half['kl'], rtol=1e-6)
  after = losses.total_loss(f, m, y, jnp.ones(1), 9, cfg)
  assert float(after['distill_scale']) == 1.0
  assert 'distill_scale' not in plain
