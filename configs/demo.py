"""``--config=configs/demo.py[:variant]`` from a checkout: the config of
``mstkd_jax/configs/demo.py`` (installed: ``--config=demo[:variant]``). Edit that file."""

from mstkd_jax.configs.demo import get_config  # noqa: F401
