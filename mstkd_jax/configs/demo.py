"""The demo: a small MST-KDNet trained for a few minutes on this CPU, then evaluated.

    mstkd-train --config=demo --workdir=/tmp/mstkd-demo
    python -m mstkd_jax.main --config=configs/demo.py --workdir=/tmp/mstkd-demo   # a checkout

With no data root it writes 10 synthetic BraTS-like cases (96 x 96 x 80 voxels of 2 mm, a
brain of real size) into ``<workdir>/synthetic``, trains teacher and student on 48^3 windows,
validates on the validation case, evaluates the 15 modality subsets on the test cases, prints
the table and draws the Figure-2 style picture (``<workdir>/figure.png``).

The same config trains on real cases at 2 mm:

    mstkd-train --config=demo --workdir=runs/demo-brats2018 \
        --config.data.root=/data/BraTS2018 --config.data.layout=brats2021

Variants as in brats.py, applied on top: ``--config=demo:plain`` (no distillation),
``:no_mstkd``, ``:no_gsme``, ``:no_slkd``. Any field can still be overridden on the command line
(``--config.train.epochs=40``).
"""

from mstkd_jax.configs import brats, cpu_real


def get_config(arg=None):
  # The short-budget recipe of configs/cpu_real.py (why each value: that file and
  # experiments/RESULTS_eval.md), on synthetic cases.
  c = cpu_real.recipe(brats.base_config())
  c.data.synthetic_cases = 10            # split 7 train / 1 val / 2 test
  # A brain of real size written directly at 2 mm (192 x 192 x 160 mm field of view; semi-axes
  # about 60-70 mm), so that the enhancing rim is 1-3 voxels thick as in real cases at 2 mm.
  c.data.synthetic_shape = (96, 96, 80)
  c.data.synthetic_spacing = 2.0
  c.data.synthetic_layout = 'brats2021'
  c.train.epochs = 12                    # 84 steps on the 7 synthetic training cases
  c.train.log_every = 10
  c.train.eval_every_epochs = 5
  # Centre window (the paper's protocol): the central 48^3 of each brain box. Sliding windows over the whole
  # box cost 8-12 windows per input and subset: --config.eval.sliding_window=True.
  c.eval.figure = True
  return cpu_real.apply_variants(c, arg)
