"""The project's configs, shipped with the package.

  brats     MST-KDNet with the paper's defaults, BraTS 2023/2024 GLI file names
  fets      the same for FeTS 2024 / BraTS 2018-2021 file names
  cpu_real  the short-budget recipe (about an hour on a 2-core CPU, real cases at 2 mm)
  demo      cpu_real on synthetic cases: the demo

``--config`` of every command takes a name, ``--config=brats`` or with a variant
``--config=brats:tiny`` (variants: each file's docstring), or the path of any Python file that
defines ``get_config(arg=None)`` (``--config=configs/brats.py:tiny`` from a checkout, where
``configs/`` re-exports these files, or ``--config=my_config.py``).
"""

import importlib.util
import os

NAMES = ('brats', 'fets', 'cpu_real', 'demo')

CONFIG_HELP = ('give a config name (' + ', '.join(NAMES) + ', with an optional :variant, e.g. '
             'brats:tiny) or the path of a Python config file')


def path(name):
  """The file of the packaged config ``name``."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{name}.py')


def resolve(spec):
  """``NAME[:variant]`` of a packaged config -> ``<its file>[:variant]``; any other value (a
  file path) comes back as it is."""
  name, sep, variant = str(spec).partition(':')
  if name in NAMES:
    return path(name) + sep + variant
  return spec


def load(spec):
  """The ConfigDict of ``spec`` (a name or a file, ``[:variant]``), unlocked; raises
  FileNotFoundError for a file that does not exist."""
  file, _, variant = resolve(spec).partition(':')
  if not os.path.isfile(file):
    raise FileNotFoundError(f'config {spec}: no file {file}; {CONFIG_HELP}')
  module_spec = importlib.util.spec_from_file_location('_mstkd_config', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)
