"""Which loss terms steer the student? Per-term gradient norms and their agreement with Dice.

For a training workdir (its config.json, its checkpoints and its training cases), this takes
the student's weighted loss terms one at a time,

    parts = {student Dice: w_m L_dice(student), EVD: lambda1 alpha L_EVD, MST: lambda1 beta
             L_MST, agreement: lambda2 w(epoch) L_mse, KL: lambda2 L_KL, adversarial:
             lambda3 epsilon L_adv, style: lambda3 theta L_style, content: c L_content}

(``losses.weighted_terms``: the shares of the training loss, which is their sum),
and measures for each part, on a few training batches and modality subsets:

  * ||g_part||: the norm of its gradient with respect to the student's parameters;
  * cos(g_part, g_dice): its cosine with the student Dice gradient (negative: the term pulls
    against the student's own segmentation loss).

It prints one JSON line per (checkpoint, part) with the mean over batches x subsets. Steps:
``--steps init`` is a fresh state from the run's seed (what the first updates see), a number is
that checkpoint. Example (a run of experiments/compare_variants.py):

    python experiments/term_gradients.py --workdir runs/cv5/fold0/mstkd --steps init,1200 \
        --batches 4 --subsets T1Gd,T2,T1+T2,FLAIR+T1+T1Gd+T2

Measures directions, not outcomes: a term can pull against Dice on a batch and still help on
held-out cases (a regulariser does exactly that). The outcome is compare_variants.py's job.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mstkd_jax import checkpoint, compile_cache, losses, modalities, optim, step  # noqa: E402
from mstkd_jax.data import pipeline  # noqa: E402
from mstkd_jax.models import build  # noqa: E402


def make_measure(config):
  """(state params, batch stats, disc params, image, label, subset mask, keys, epoch) ->
  ({part: value}, {part: gradient norm}, {part: cosine with the student Dice gradient}),
  compiled once."""

  def parts_of(student, params, batch_stats, disc_params, image, image_m, label, keys, epoch):
    p = {'teacher': params['teacher'], 'student': student}
    _, (terms, *_) = step.network_objective(p, batch_stats, disc_params, image, image_m, label,
                                            keys, epoch, config)
    return losses.weighted_terms(terms, config.loss)

  @jax.jit
  def measure(params, batch_stats, disc_params, image, label, mask, keys, epoch):
    image_m = modalities.apply_masks(image, mask[None])
    args = (params, batch_stats, disc_params, image, image_m, label, keys, epoch)
    parts = parts_of(params['student'], *args)
    # One reverse pass per part: {part: gradient tree over the student's parameters}.
    jac = jax.jacrev(lambda s: parts_of(s, *args))(params['student'])
    flat = {n: jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for n, t in jac.items()}
    norms = {n: jnp.linalg.norm(g) for n, g in flat.items()}
    ref = flat['dice_student']
    cos = {n: g @ ref / jnp.maximum(norms[n] * norms['dice_student'], 1e-30)
           for n, g in flat.items()}
    return parts, norms, cos

  return lambda *args: jax.device_get(measure(*args))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--workdir', required=True, help='a training workdir (config.json, checkpoints)')
  ap.add_argument('--steps', default='init', help="comma-separated: 'init' and/or checkpoint steps")
  ap.add_argument('--batches', type=int, default=4, help='training batches per checkpoint')
  ap.add_argument('--subsets', default='T1Gd,T2,T1+T2,FLAIR+T1+T1Gd+T2',
                  help='modality subsets the student sees (each batch is measured under each)')
  ap.add_argument('--out', help='also write the JSON lines to this file')
  args = ap.parse_args(argv)
  compile_cache.enable()

  config = checkpoint.load_config(args.workdir)
  dataset = pipeline.prepare(config, args.workdir, progress=False)
  num_train = len(dataset.ids('train'))
  steps_per_epoch = optim.steps_per_epoch(config, num_train, config.train.batch_size_per_device)
  loader = pipeline.make_train_loader(dataset, batch_size=1, seed=config.seed + 12345)
  batches = [next(loader) for _ in range(args.batches)]
  loader.close()
  subsets = modalities.parse_subsets(args.subsets)
  masks = modalities.subset_masks(subsets)
  out = open(args.out, 'a') if args.out else None
  run = make_measure(config)

  for which in [s.strip() for s in args.steps.split(',') if s.strip()]:
    if which == 'init':
      state = jax.jit(lambda k: build.init_state(config, k, steps_per_epoch))(
          jax.random.key(config.seed))
      at_step = 0
    else:
      manager = checkpoint.make_manager(os.path.join(args.workdir, 'checkpoints'), read_only=True)
      at_step = int(which)
      state, _, _ = checkpoint.restore(manager, at_step, build.abstract_state(config),
                                       with_data=False)
      manager.close()
    acc = {}
    for b, batch in enumerate(batches):
      image = jnp.asarray(batch['image'], jnp.float32)
      label = jnp.asarray(batch['label'], jnp.float32)
      for s, mask in enumerate(masks):
        keys = tuple(jax.random.split(jax.random.key(1000 * b + s), 2))
        parts, norms, cos = run(state.params, state.batch_stats, state.disc_params,
                                image, label, jnp.asarray(mask), keys,
                                jnp.asarray(at_step // steps_per_epoch, jnp.int32))
        for n in parts:
          if n != 'dice_teacher':   # no gradient on the student
            acc.setdefault(n, []).append((parts[n], norms[n], cos[n]))
    for n in sorted(acc):
      v = np.asarray(acc[n])
      line = {'workdir': args.workdir, 'step': which, 'part': n,
              'value': float(v[:, 0].mean()), 'grad_norm': float(v[:, 1].mean()),
              'cos_with_dice': float(v[:, 2].mean()),
              'cos_negative_share': float((v[:, 2] < 0).mean()),
              'samples': len(v), 'subsets': args.subsets}
      print(json.dumps(line), flush=True)
      if out:
        out.write(json.dumps(line) + '\n')
  if out:
    out.close()


if __name__ == '__main__':
  main()
