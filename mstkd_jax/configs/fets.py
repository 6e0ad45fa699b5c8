"""MST-KDNet on FeTS 2024 / BraTS 2021 (labels 1 NCR, 2 ED, 4 ET): the paper's defaults.

Same variants as brats.py (``--config=fets:tiny``, ``:no_mstkd``, ...).
"""

from mstkd_jax.configs import brats


def get_config(arg=None):
  c = brats.get_config(arg)
  c.data.layout = 'brats2021'
  return c
