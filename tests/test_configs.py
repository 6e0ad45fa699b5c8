"""The packaged configs: names and paths give the same config, and eval / export on a workdir
read its config.json when no --config is given."""

import json
import os
import subprocess
import sys

import pytest

from mstkd_jax import configs
from tests import helpers_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('name', configs.NAMES)
def test_a_name_and_the_checkout_path_give_the_same_config(name):
  by_name = configs.load(name)
  by_path = configs.load(os.path.join(ROOT, 'configs', f'{name}.py'))
  assert by_name.to_dict() == by_path.to_dict()


def test_variants_and_paths_resolve():
  assert configs.resolve('brats:tiny') == configs.path('brats') + ':tiny'
  assert configs.resolve('configs/brats.py:tiny') == 'configs/brats.py:tiny'
  assert configs.load('brats:tiny,plain').loss.lambda_mstkd == 0.0
  assert configs.load('demo').data.synthetic_cases == 10
  with pytest.raises(FileNotFoundError, match='brats, fets, cpu_real, demo'):
    configs.load('nope.py')


def test_the_package_ships_its_configs_and_no_top_level_configs_package():
  import tomllib
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)
  assert project['tool']['hatch']['build']['targets']['wheel']['packages'] == ['mstkd_jax']
  for name in configs.NAMES:
    assert os.path.isfile(configs.path(name))


def _main(args, cwd):
  environ = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  environ.pop('MSTKD_TRACEBACK', None)
  return subprocess.run([sys.executable, '-m', 'mstkd_jax.main'] + args, capture_output=True,
                        text=True, cwd=cwd, env=environ, timeout=600)


def test_export_reads_the_workdirs_config_and_checks_a_given_one(tmp_path_factory, tmp_path):
  run = helpers_eval.trained_run(tmp_path_factory)
  out = tmp_path / 'student'
  proc = _main([f'--workdir={run.workdir}', '--mode=export', f'--out={out}'], str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'read only' not in proc.stderr
  with open(out / 'config.json') as f:
    assert json.load(f)['model'] == json.loads(run.config.to_json_best_effort())['model']
  # A given config must fit the checkpoint: one line naming the differing field.
  proc = _main([f'--workdir={run.workdir}', '--mode=export', f'--out={tmp_path / "other"}',
                '--config=brats:tiny', '--config.model.init_channels=8'], str(tmp_path))
  assert proc.returncode == 2
  assert 'model.init_channels: config 8, checkpoint 4' in proc.stderr
  assert not (tmp_path / 'other').exists()


def test_eval_without_config_needs_a_workdir_config(tmp_path):
  proc = _main([f'--workdir={tmp_path}', '--mode=eval'], str(tmp_path))
  assert proc.returncode == 2
  assert 'has no config.json' in proc.stderr and '--config' in proc.stderr
  proc = _main([f'--workdir={tmp_path / "new"}'], str(tmp_path))
  assert proc.returncode == 2
  assert '--config is required to train' in proc.stderr
  assert not (tmp_path / 'new').exists()
