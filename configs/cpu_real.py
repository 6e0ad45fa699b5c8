"""``--config=configs/cpu_real.py[:variant]`` from a checkout: the config of
``mstkd_jax/configs/cpu_real.py`` (installed: ``--config=cpu_real[:variant]``). Edit that file."""

from mstkd_jax.configs.cpu_real import apply_variants, get_config, recipe  # noqa: F401
