"""One short training run shared by the evaluation, export and prediction tests.

``trained_run(tmp_path_factory)`` trains :tiny for 2 steps on 4 synthetic cases with
``run.train_and_evaluate`` (validation at the end, the test split evaluated), once per test
session, and returns a ``Run`` (config, workdir, final state). The evaluation forward pass is
cached per config in ``evaluate``, so every test reuses one compilation.
"""

import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

_RUNS = {}


@dataclasses.dataclass
class Run:
  config: object
  workdir: str
  state: object


def tiny_eval_config():
  from configs.brats import get_config
  c = get_config('tiny')
  c.eval.batch_size = 4     # 15 subsets -> 4 batches, the last one padded
  return c


def trained_run(tmp_path_factory) -> Run:
  if 'run' not in _RUNS:
    from mstkd_jax import run
    config = tiny_eval_config()
    workdir = str(tmp_path_factory.mktemp('trained_tiny'))
    state = run.train_and_evaluate(config, workdir, max_steps=2)
    _RUNS['run'] = Run(config, workdir, state)
  return _RUNS['run']


def exported(tmp_path_factory) -> str:
  """The student of the shared run exported once (``export.export_student``)."""
  if 'export' not in _RUNS:
    from mstkd_jax import export
    run = trained_run(tmp_path_factory)
    _RUNS['export'] = export.export_student(run.config, run.workdir, None,
                                            os.path.join(run.workdir, 'export'))
  return _RUNS['export']
