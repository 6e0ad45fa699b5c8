r"""Validate every case of a data folder.

  python -m mstkd_jax.data.check --root DIR [--layout auto|brats2024|brats2021] [--workers N]

Reads every file of every case (as training would) and prints one line per problem::

  PROBLEM BraTS2021_00003: BraTS2021_00003_t1.nii.gz: 12 NaN or Inf voxels

then a summary. Exit code 0 only when there is at least one case and every case is usable;
1 otherwise (also for a missing or empty root).
"""

import argparse
import collections
import concurrent.futures
import multiprocessing
import sys

from mstkd_jax.data import layouts
from mstkd_jax.data import preprocess
from mstkd_jax.data.layouts import BadCaseError, DataError
from mstkd_jax.logging_utils import Progress


def check_case(case):
  """Every problem of one case (an empty list when it is usable)."""
  try:
    preprocess.read_case(case, require_label=True)
  except BadCaseError as e:
    return e.problems
  return []


def check_root(root, layout='auto', workers=0, progress=None):
  """[(case id, [problems])] for every case under root; raises DataError for a bad root."""
  cases = layouts.discover_cases(root, layout)
  results = []
  if workers and workers > 0 and len(cases) > 1:
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(cases)), mp_context=ctx) as ex:
      for n, problems in enumerate(ex.map(check_case, cases), 1):
        results.append(problems)
        if progress:
          progress(n, len(cases))
  else:
    for n, case in enumerate(cases, 1):
      results.append(check_case(case))
      if progress:
        progress(n, len(cases))
  return [(c.case_id, p) for c, p in zip(cases, results)], cases


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m mstkd_jax.data.check',
                              description='Validate every case of a BraTS/FeTS data folder.')
  p.add_argument('--root', required=True)
  p.add_argument('--layout', default='auto')
  p.add_argument('--workers', type=int, default=0, help='parallel processes (0: none)')
  p.add_argument('--quiet', action='store_true', help='no progress on stderr')
  args = p.parse_args(argv)

  bar = None

  def progress(n, total):
    nonlocal bar
    if bar is None:    # a bar on a terminal only: nothing in a log file
      bar = Progress(total, 'check', unit='case', log_lines=False)
    bar.update_to(n)

  try:
    results, cases = check_root(args.root, args.layout, args.workers,
                                None if args.quiet else progress)
  except (DataError, ValueError) as e:
    print(f'ERROR: {e}')
    return 1
  finally:
    if bar is not None:
      bar.close()
  bad = [(cid, ps) for cid, ps in results if ps]
  for _, problems in bad:
    for prob in problems:
      print(f'PROBLEM {prob}')
  layouts_seen = collections.Counter(c.layout for c in cases)
  print(f'{len(results)} cases ({", ".join(f"{n} {k}" for k, n in sorted(layouts_seen.items()))}'
        f'): {len(results) - len(bad)} usable, {len(bad)} with problems '
        f'({sum(len(ps) for _, ps in bad)} problems)')
  return 0 if not bad else 1


if __name__ == '__main__':
  sys.exit(main())
