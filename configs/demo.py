"""The demo: a small MST-KDNet trained for a few minutes on this CPU, then evaluated.

    python -m mstkd_jax.main --config=configs/demo.py --workdir=/tmp/mstkd-demo

With no data root it writes synthetic BraTS-like cases (1 mm voxels, 144 x 144 x 128) into
``<workdir>/synthetic``, resamples them to 2 mm (72 x 72 x 64 voxels), trains teacher and
student on 64^3 windows, validates on the validation case, evaluates the 15 modality subsets on
the test cases (sliding windows over the whole brain box), prints the table and draws the
Figure-2 style picture (``<workdir>/figure.png``).

The same config trains on real cases at 2 mm:

    python -m mstkd_jax.main --config=configs/demo.py --workdir=runs/demo-brats2018 \
        --config.data.root=../shared/data/brats2018 --config.data.layout=brats2021

Variants as in configs/brats.py, applied on top: ``configs/demo.py:plain`` (no distillation),
``:no_mstkd``, ``:no_gsme``, ``:no_slkd``. Any field can still be overridden on the command line
(``--config.train.epochs=40``).
"""

from configs import brats

# Tokens the demo's transformer sees: a 64^3 input gives an 8^3 map at c3d, patches of 2 -> 64.
_TOKENS = 64


def get_config(arg=None):
  c = brats.base_config()
  # A small network (about 2 % of the paper's width) that still has every part of MST-KDNet.
  c.model.update(init_channels=8, groups=4, embed_dim=64, num_heads=4, num_layers=4,
                 mlp_dim=128, patch_size=2, kept_blocks=(1, 2, 3, 4),
                 decoder_channels=(64, 32, 32, 16, 16))
  c.discriminator.channels = (16, 32)
  # The attention products shrink like 1 / tokens^2 (squared again by the MSE): keep the EVD
  # term's weight relative to the paper's 120 tokens.
  c.loss.evd_alpha = 1e8 * (_TOKENS / 120.0) ** 4

  c.data.input_shape = (64, 64, 64)
  c.data.spacing = 2.0
  c.data.synthetic_cases = 10            # split 7 train / 1 val / 2 test
  c.data.synthetic_shape = (144, 144, 128)   # 1 mm voxels -> 72 x 72 x 64 at 2 mm
  c.data.synthetic_layout = 'brats2021'
  c.data.workers = 0
  c.data.rotation_prob = 0.0

  c.train.epochs = 20
  c.train.learning_rate = 2e-3           # a few hundred steps instead of the paper's 250 epochs
  c.train.disc_learning_rate = 2e-4
  c.train.log_every = 10
  c.train.checkpoint_every = 1000
  c.train.eval_every_epochs = 5
  c.train.keep_checkpoints = 2
  # The output-agreement ramp-up is per epoch (20 in the paper); scale it to the short run.
  c.loss.agreement_rampup_epochs = 5.0

  c.eval.batch_size = 4
  c.eval.sliding_window = True
  c.eval.figure = True

  for name in (arg or '').split(','):
    name = name.strip()
    if name in ('tiny', 'cube64'):
      raise ValueError(f'variant {name!r} changes the model size; use configs/brats.py:{name}')
    brats.apply_variant(c, name)
  return c
