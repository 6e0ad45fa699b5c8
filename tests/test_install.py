"""``pip install .`` as a new user meets it: the package installed into a fresh virtual
environment, its console scripts run from a folder outside the checkout.

The environment reuses this interpreter's installed dependencies (a ``.pth`` file naming its
site-packages) and installs the project with ``--no-deps``: nothing is downloaded but the
build backend pip builds the wheel with.
"""

import glob
import os
import site
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def _leftovers():
  """Build folders a setuptools build leaves in the checkout."""
  return set(glob.glob(os.path.join(ROOT, '*.egg-info'))) | set(
      glob.glob(os.path.join(ROOT, 'build')))


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """(bin folder, environment for subprocesses) of a fresh venv holding the package."""
  venv = tmp_path_factory.mktemp('venv')
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  purelib = subprocess.run(
      [str(venv / 'bin' / 'python'), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
      capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(purelib, 'zz_dependencies.pth'), 'w') as f:
    f.write('\n'.join(site.getsitepackages()) + '\n')
  before = _leftovers()
  proc = subprocess.run([sys.executable, '-m', 'pip', '--python', str(venv / 'bin' / 'python'),
                         'install', '--no-deps', '--quiet', ROOT],
                        capture_output=True, text=True, timeout=600)
  if proc.returncode and 'No matching distribution found' in proc.stderr:
    pytest.skip('the build backend (hatchling) cannot be downloaded here: ' + proc.stderr[-300:])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _leftovers() == before, 'pip install . left build folders in the checkout'
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'MSTKD_TRACEBACK')}
  env.update(JAX_PLATFORMS='cpu', PATH=str(venv / 'bin') + os.pathsep + env.get('PATH', ''))
  return venv / 'bin', env


def _run(installed, args, cwd, timeout=600):
  bin_dir, env = installed
  return subprocess.run([str(bin_dir / args[0])] + list(args[1:]), capture_output=True,
                        text=True, cwd=str(cwd), env=env, timeout=timeout)


def test_the_package_is_imported_from_the_environment_without_a_configs_package(installed,
                                                                              tmp_path):
  code = ('import importlib.util, mstkd_jax, mstkd_jax.configs as c; print(mstkd_jax.__file__); '
          'print(importlib.util.find_spec("configs")); print(c.path("demo"))')
  proc = _run(installed, ['python', '-c', code], tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  package, configs_spec, demo = proc.stdout.split()
  assert not package.startswith(ROOT) and 'site-packages' in package
  assert configs_spec == 'None'              # no top-level "configs" to collide with others
  assert os.path.isfile(demo) and not demo.startswith(ROOT)


def test_every_console_script_lists_its_flags(installed, tmp_path):
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  for script in scripts:
    proc = _run(installed, [script, '--help'], tmp_path, timeout=120)
    assert proc.returncode == 0, (script, proc.stderr[-2000:])
    listing = proc.stdout.partition('\nflags:\n')[2]
    assert listing.count('--') >= 2, (script, proc.stdout)


def test_the_demo_by_name_then_export_without_config(installed, tmp_path):
  """``mstkd-train --config=demo`` (shortened) from a folder outside the checkout, then the
  export of that workdir with no --config (its config.json is read)."""
  workdir = tmp_path / 'demo'
  proc = _run(installed, ['mstkd-train', '--config=demo', f'--workdir={workdir}',
                          '--max_steps=2', '--config.data.synthetic_cases=5',
                          '--config.eval.batch_size=8'], tmp_path, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert (workdir / 'eval' / 'summary.json').is_file() and (workdir / 'figure.png').is_file()
  assert 'read only' not in proc.stderr
  proc = _run(installed, ['mstkd-train', f'--workdir={workdir}', '--mode=export',
                          f'--out={tmp_path / "student"}'], tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert (tmp_path / 'student' / 'manifest.json').is_file()
  assert 'read only' not in proc.stderr
