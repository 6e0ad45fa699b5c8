"""Data parallelism: results do not depend on the device count or the number of processes.

The multi-device runs happen in subprocesses with forced CPU devices
(``--xla_force_host_platform_device_count``), so this process keeps its single device.
"""

import json
import os

import numpy as np
import pytest

from tests import helpers_scale

LOSS_TERMS = ('total', 'dice', 'dice_teacher', 'dice_student', 'mstkd', 'logit', 'gsme', 'disc')


def devices_report():
  return helpers_scale.scenario_once('devices', ['--shard'], devices=4, timeout=900)


LR = 1e-4   # :tiny's learning rate: Adam moves each parameter by at most about lr per step


def assert_same_step(cmp, what):
  """Two states after one step from the same start agree (see the devices test)."""
  rel = cmp['rel']
  for part in ('adam_mu', 'adam_nu', 'batch_stats', 'disc_params', 'disc_opt_state'):
    assert rel[part] < 1e-5, (what, part, cmp)
  assert rel['params'] < 1e-4, (what, cmp)
  assert cmp['params_changed_fraction'] < 1e-4, (what, cmp)
  assert cmp['max_abs_params'] <= 2 * LR * 1.01, (what, cmp)
  assert cmp['max_abs_gradient_free_params'] <= 2 * LR * 1.01, (what, cmp)


@pytest.mark.slow
def test_one_step_does_not_depend_on_the_device_count():
  """One step on the same global batch of 4 with 1, 2 and 4 devices (and 4 with the state
  sharded over them) against 1 device.

  Same losses (1e-5). Same gradients: after one step Adam's moments are exactly 0.1 g and
  0.01 g^2, and they agree to 1e-5 relative; so do the BatchNorm statistics and the
  discriminator. The parameters agree to 1e-5 relative except where Adam's first step decides
  on rounding: it moves each parameter by lr x g / (|g| + 1e-8), i.e. by +-lr whatever the
  size of g, so an element whose gradient is within rounding of zero can move the other way
  (at most 2 lr apart; a few elements in 10^5: ~1e-5 relative over all parameters), and a
  parameter whose gradient is zero in exact arithmetic (a bias right before a BatchNorm, the
  attention key bias; found from the 1-device run, a clean gap below the others) moves by
  +-lr on noise alone. Those are only checked to stay within 2 lr.
  """
  report, _, _ = devices_report()
  assert report['device_count'] == 4
  free = report['gradient_free']
  assert all(name.endswith("['bias']") for name in free['leaves']), free['leaves']
  assert free['largest_free_ratio'] < 0.05 * free['smallest_kept_ratio']   # a clean gap
  runs = report['runs']
  base = runs['1']['metrics']
  for name in ('2', '4', '4_sharded'):
    run = runs[name]
    for term in LOSS_TERMS:
      assert run['metrics'][term] == pytest.approx(base[term], rel=1e-5, abs=1e-6), (name, term)
    assert_same_step(run['compare_vs_1'], name)
  # The sharded variant really splits large arrays over the 4 devices.
  assert 'data' in runs['4_sharded']['largest_param_sharding']
  assert 'data' not in runs['4']['largest_param_sharding']


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_each_other_and_one_process(tmp_path):
  """jax.distributed on 127.0.0.1 (gloo): 2 processes x 1 CPU device, 2 volumes each."""
  workdir = str(tmp_path / 'work')
  port = _free_port()
  procs, logs = [], []
  for pid in range(2):
    logs.append(str(tmp_path / f'p{pid}.log'))
    procs.append(helpers_scale.start_helper(
        ['train', '--workdir', workdir, '--steps', '3', '--checkpoint-every', '100',
         '--batch-per-device', '2', '--dump', str(tmp_path / f'p{pid}.npz')],
        devices=1, log_path=logs[-1], MSTKD_COORDINATOR=f'127.0.0.1:{port}',
        MSTKD_NUM_PROCESSES=2, MSTKD_PROCESS_ID=pid))
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      p.kill()
  texts = [open(log).read() for log in logs]
  assert codes == [0, 0], '\n\n'.join(t[-3000:] for t in texts)
  assert 'process 1 of 2' not in texts[1]    # the others log warnings only

  a, b = np.load(tmp_path / 'p0.npz'), np.load(tmp_path / 'p1.npz')
  assert sorted(a.files) == sorted(b.files)
  assert all(np.array_equal(a[k], b[k]) for k in a.files)
  with open(tmp_path / 'p0.npz.json') as f:
    assert json.load(f)['served'] == [0, 1, 2]

  # One process (2 devices, same global batch, same 3 steps): the losses of each step agree
  # to 1e-5 at step 1 and 1e-3 after. The states agree to 1e-3 relative only: both processes
  # reduce gradients as well as one process does (rounding ~1e-5, devices test), but Adam's
  # first steps move every parameter by about +-lr whatever its gradient's size, so elements
  # whose gradient is within rounding of zero move differently and the next steps' gradients
  # follow (a property of Adam, seen as well between two single-process device counts).
  report, out, _ = devices_report()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    two = [json.loads(line) for line in f]
  with open(os.path.join(out, 'reference', 'metrics.jsonl')) as f:
    one = [json.loads(line) for line in f]
  assert [m['step'] for m in two] == [m['step'] for m in one] == [1, 2, 3]
  for m2, m1 in zip(two, one):
    for term in LOSS_TERMS:
      tol = 1e-5 if m1['step'] == 1 else 1e-3
      assert m2[term] == pytest.approx(m1[term], rel=tol, abs=1e-6), (m1['step'], term)
  ref = np.load(os.path.join(out, 'reference.npz'))
  cmp = helpers_scale.compare_after_adam_step({k: a[k] for k in a.files},
                                              {k: ref[k] for k in ref.files},
                                              report['gradient_free']['leaves'])
  for part in ('params', 'batch_stats', 'disc_params'):
    assert cmp['rel'][part] < 1e-3, cmp
  assert cmp['max_abs_gradient_free_params'] <= 3 * 2 * LR * 1.01, cmp

  # Only process 0 writes logs and config; the checkpoint holds both data states.
  assert os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert len(f.readlines()) == 3
  data = os.listdir(os.path.join(workdir, 'checkpoints', '3', 'data'))
  assert sorted(n for n in data if n.startswith('process_')) == [
      'process_0-of-2.json', 'process_1-of-2.json']


@pytest.mark.slow
def test_remat_and_bfloat16():
  """Remat gives the same step; bf16 compiles and keeps float32 state, losses and metrics."""
  report, _, _ = helpers_scale.scenario_once('precision')
  f32, remat, bf16 = report['f32'], report['f32_remat'], report['bf16_remat']
  for term in LOSS_TERMS:
    assert remat['metrics'][term] == pytest.approx(f32['metrics'][term], rel=1e-5, abs=1e-6)
  assert_same_step(remat['compare_vs_f32'], 'remat')
  assert all(bf16['metric_dtypes'][t] == 'float32' for t in LOSS_TERMS)
  assert bf16['state_float_dtypes'] == ['float32']
  assert np.isfinite(bf16['metrics']['total'])
  assert bf16['metrics']['dice'] == pytest.approx(f32['metrics']['dice'], rel=5e-2)


@pytest.mark.slow
def test_two_processes_evaluate_and_export_a_single_process_checkpoint(tmp_path,
                                                                         tmp_path_factory):
  """``--mode=eval`` and ``--mode=export`` as a 2-process job (gloo) on the checkpoint of a
  1-process run: every process reads a whole replicated copy (the saved shardings name
  process 0's device only), the table equals the 1-process evaluation's."""
  import shutil
  import subprocess
  import sys
  from mstkd_jax import export
  from tests import helpers_eval
  run = helpers_eval.trained_run(tmp_path_factory)
  workdir = str(tmp_path / 'work')
  shutil.copytree(run.workdir, workdir, ignore=shutil.ignore_patterns('export', '.mstkd.lock'))
  with open(os.path.join(run.workdir, 'eval', 'per_case.csv')) as f:
    single = f.read()
  shutil.rmtree(os.path.join(workdir, 'eval'))
  for mode in ('eval', 'export'):
    port, procs, logs = _free_port(), [], []
    for pid in range(2):
      logs.append(tmp_path / f'{mode}{pid}.log')
      env = helpers_scale.helper_env(1, MSTKD_COORDINATOR=f'127.0.0.1:{port}',
                                     MSTKD_NUM_PROCESSES=2, MSTKD_PROCESS_ID=pid)
      with open(logs[-1], 'w') as log:
        procs.append(subprocess.Popen(
            [sys.executable, '-m', 'mstkd_jax.main', f'--mode={mode}', f'--workdir={workdir}'],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=helpers_scale.ROOT))
    try:
      codes = [p.wait(timeout=600) for p in procs]
    finally:
      for p in procs:
        p.kill()
    assert codes == [0, 0], '\n\n'.join(log.read_text()[-3000:] for log in logs)
  with open(os.path.join(workdir, 'eval', 'per_case.csv')) as f:
    assert f.read() == single
  assert export.is_complete(os.path.join(workdir, 'export'))
