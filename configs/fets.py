"""``--config=configs/fets.py[:variant]`` from a checkout: the config of
``mstkd_jax/configs/fets.py`` (installed: ``--config=fets[:variant]``). Edit that file."""

from mstkd_jax.configs.fets import get_config  # noqa: F401
