"""``python -m mstkd_jax.predict``: the prediction command (``mstkd_jax.predict.command``)."""

from mstkd_jax.predict.command import console_main

if __name__ == '__main__':
  console_main()
