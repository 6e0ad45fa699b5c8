"""The benchmark scripts under experiments/ run (smoke sizes), so they cannot rot."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers_scale import ROOT, xla_cache_dir


def _run(args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=xla_cache_dir(),
             PYTHONPATH=ROOT)
  return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
  """experiments/gpu_check.py --smoke: the GPU check's every code path at :tiny size on the
  CPU, one JSON line per case, nothing failing."""
  out = tmp_path / 'gpu_check.jsonl'
  proc = _run(['experiments/gpu_check.py', '--smoke', '--steps', '2', '--warmup', '1',
               '--out', str(out)])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  by_case = {line['case']: line for line in lines}
  assert set(by_case) == {'env', 'step_f32', 'eval_f32'}
  assert not any('error' in line for line in lines), lines
  assert by_case['env']['backend'] == 'cpu'
  step = by_case['step_f32']
  assert step['shape'] == [32, 32, 32] and step['finite']
  assert step['sec_per_step_median'] > 0 and step['compile_s'] > 0
  assert by_case['eval_f32']['rows'] == 16 * 3     # 15 subsets + the teacher, 3 regions


def test_gpu_check_reports_a_failing_case_and_goes_on(tmp_path):
  """A case that fails is one JSON line with its error; the next case still runs."""
  proc = _run(['experiments/gpu_check.py', '--smoke', '--cases', 'no_such_case,env'],
              timeout=300)
  assert proc.returncode == 1
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  assert [line['case'] for line in lines] == ['no_such_case', 'env']
  assert 'error' in lines[0] and 'error' not in lines[1]
