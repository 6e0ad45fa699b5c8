"""The configs of ``mstkd_jax/configs``, under the paths a checkout's commands name
(``--config=configs/brats.py:tiny``). An installed package takes the short names instead
(``--config=brats:tiny``); both give the same config."""
