"""Our step (or forward) and the authors' PyTorch one, alternated in one run, as JSON.

  python experiments/bench_vs_torch.py --ref /path/to/ref_torch_step.py \\
      --mirror /path/to/MST-KDNet.git --pairs 3                       # train step at 64^3
  python experiments/bench_vs_torch.py --ref ... --mirror ... --mode infer --pairs 3
                                                                      # full-size forward

The authors' side is their code timed by ``ref_torch_step.py``, a small script that times the
authors' PyTorch training step (or forward pass) on their own files (not part of this
repository: pass its path with ``--ref``; experiments/RESULTS_speed.md says what it does). It
reads their files from a local mirror of Quanato607/MST-KDNet, given by ``--mirror`` or
``$MSTKD_REF_MIRROR``. Runs alternate ours / theirs ``--pairs`` times, each in
a fresh process; each run reports its minimum seconds per step (or forward) and its peak
resident memory. Printed, one JSON object per run, then a summary line with the median of the
pairwise time ratios (ours / theirs) and of the memory ratios, and the load average around
each run. Ratios below 1 mean ours is faster or smaller.

  train   ours: bench_step.py --config=configs/brats.py:cube64 (64^3, full widths);
          theirs: ref_torch_step.py --shape 64 64 64
  infer   ours: bench_step.py --mode infer --config=configs/brats.py (160x192x128, one
          network); theirs: ref_torch_step.py --mode infer
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _last_json(text):
  for line in reversed(text.splitlines()):
    line = line.strip()
    if line.startswith('{'):
      return json.loads(line)
  raise ValueError('no JSON line in the output:\n' + text[-2000:])


def run(cmd, cwd=ROOT):
  load_before = os.getloadavg()[0]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  result = _last_json(proc.stdout)
  result['loadavg1_before'] = round(load_before, 2)
  result['loadavg1_after'] = round(os.getloadavg()[0], 2)
  return result


def ours_cmd(mode, steps, root=ROOT):
  base = [sys.executable, os.path.join(root, 'experiments', 'bench_step.py'),
          '--steps', str(steps), '--warmup', '1']
  if mode == 'train':
    return base + ['--config=configs/brats.py:cube64']
  return base + ['--mode', 'infer', '--config=configs/brats.py']


def theirs_cmd(args):
  cmd = [args.torch_python, args.ref, '--mirror', args.mirror, '--steps', str(args.steps),
         '--threads', str(args.threads)]
  if args.mode == 'train':
    return cmd + ['--shape', '64', '64', '64']
  return cmd + ['--mode', 'infer']


def seconds(result):
  return result.get('sec_per_step_min', result.get('sec_per_forward_min'))


def peak_bytes(result):
  if 'peak_host_rss_bytes' in result:
    return result['peak_host_rss_bytes']
  return result['peak_rss_mib'] * 2**20


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--ref', required=True, help='path to ref_torch_step.py')
  parser.add_argument('--mirror', default=os.environ.get('MSTKD_REF_MIRROR'),
                      help='git folder of the Quanato607/MST-KDNet mirror')
  parser.add_argument('--mode', choices=('train', 'infer'), default='train')
  parser.add_argument('--pairs', type=int, default=3)
  parser.add_argument('--steps', type=int, default=3, help='timed steps per run')
  parser.add_argument('--threads', type=int, default=2, help="PyTorch's threads")
  parser.add_argument('--torch-python', default=sys.executable,
                      help='the Python that has torch (default: this one)')
  parser.add_argument('--ours-root', default=ROOT,
                      help='the checkout whose bench_step.py runs as ours (default: this one; '
                      'another commit\'s worktree gives a "before" figure)')
  parser.add_argument('--out', help='append every JSON line to this file too')
  args = parser.parse_args(argv)
  if not args.mirror:
    parser.error('give the mirror: --mirror GITDIR or MSTKD_REF_MIRROR')
  lines, ratios, memory = [], [], []
  for pair in range(args.pairs):
    ours = run(ours_cmd(args.mode, args.steps, args.ours_root), cwd=args.ours_root)
    ours.update(side='ours', pair=pair)
    theirs = run(theirs_cmd(args))
    theirs.update(side='theirs', pair=pair)
    ratios.append(seconds(ours) / seconds(theirs))
    memory.append(peak_bytes(ours) / peak_bytes(theirs))
    for result in (ours, theirs):
      lines.append(result)
      print(json.dumps(result), flush=True)
  summary = {'summary': True, 'mode': args.mode, 'pairs': args.pairs,
             'ours_root': args.ours_root,
             'ours_s': [seconds(r) for r in lines if r['side'] == 'ours'],
             'theirs_s': [seconds(r) for r in lines if r['side'] == 'theirs'],
             'time_ratio_median': round(statistics.median(ratios), 3),
             'time_ratios': [round(r, 3) for r in ratios],
             'memory_ratio_median': round(statistics.median(memory), 3),
             'ours_peak_gb': [round(peak_bytes(r) / 1e9, 2) for r in lines
                              if r['side'] == 'ours'],
             'theirs_peak_gb': [round(peak_bytes(r) / 1e9, 2) for r in lines
                                if r['side'] == 'theirs']}
  lines.append(summary)
  print(json.dumps(summary), flush=True)
  if args.out:
    with open(args.out, 'a') as f:
      for line in lines:
        f.write(json.dumps(line) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
