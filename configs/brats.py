"""``--config=configs/brats.py[:variant]`` from a checkout: the config of
``mstkd_jax/configs/brats.py`` (installed: ``--config=brats[:variant]``). Edit that file."""

from mstkd_jax.configs.brats import apply_variant, base_config, get_config  # noqa: F401
