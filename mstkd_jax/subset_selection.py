r"""Inference that cannot lose information: per region, which of the available scans to use.

A student trained with modality dropout can be run on any subset of the scans a patient has.
When it segments a region better from fewer scans (experiments/RESULTS_quality.md measures
enhancing tumour from T1Gd + T2 above all four), the patient who has all four should get that
better segmentation. A *selection rule* says, for each set of available scans and each region
(WT, TC, ET), which candidate to use: one sub-subset of the available scans, or the mean of the
network's probabilities over several (an ensemble). It is chosen from a table of per-case Dice
measured on cases that the rule will not be judged on, and carried as a JSON file::

    python -m mstkd_jax.subset_selection per_case.csv [more.csv ...] --out selection.json \
        [--min_gain 0.01] [--ensembles]

``per_case.csv`` is the 15-subset evaluation of held-out cases (``--mode=eval --split=val``
writes one; a candidate table of ``experiments/subset_selection_eval.py`` also holds
ensembles). The rule for an available set A and region r is the candidate, among those using
only scans of A, with the highest mean Dice over the table's cases, kept only when it beats
using all of A by more than ``min_gain`` (Dice fraction); otherwise all of A (what prediction
does without a rule).

Applying a rule (``predict``): the network runs once per sub-subset the rule needs (absent
channels zeroed, as in training); each region is taken from its candidate (probabilities of an
ensemble averaged), and the regions are nested as the labels require, ET within TC within WT
(as nnU-Net's region-based labels are built): ET = ET_c, TC = TC_b or ET, WT = WT_a or TC.
When one candidate serves all three regions its four channels are returned unchanged; else
the returned channels are NETC/NCR = the TC score, SNFH/ED = the WT score, ET = the ET score,
background = 1 - WT score (thresholding them at 0.5 gives the composed regions exactly:
``metrics.region_masks``).

File format (``FORMAT``): {"format", "rules": {available subset name: {region: [subset names
averaged]}}, "gains": {available: {region: table gain over all of A}}, "source": {...}}.
"""

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mstkd_jax.fileio import write_json_atomic
from mstkd_jax.metrics import REGIONS
from mstkd_jax.modalities import ALL_SUBSETS, masked_copies, parse_subset, subset_name

FORMAT = 'mstkd-subset-selection/1'
FILE_NAME = 'subset_selection.json'
SEPARATOR = '|'      # between the subsets of an ensemble candidate ('T1Gd+T2|T1+T1Gd+T2')

Subset = Tuple[bool, bool, bool, bool]
Candidate = Tuple[str, ...]        # subset names whose probabilities are averaged, sorted


# ----------------------------------------------------------------------------------------------
# Candidates


def sub_subsets(available: Subset) -> List[Subset]:
  """The non-empty subsets of ``available``, in ALL_SUBSETS order."""
  return [s for s in ALL_SUBSETS if all(a or not b for a, b in zip(available, s))]


def candidate_name(candidate: Sequence[str]) -> str:
  return SEPARATOR.join(candidate)


def parse_candidate(name: str) -> Candidate:
  """'T1Gd+T2' or 'T1Gd+T2|T1+T1Gd+T2' (any subset vocabulary) -> canonical sorted names."""
  parts = [subset_name(parse_subset(p)) for p in str(name).split(SEPARATOR) if p.strip()]
  if not parts:
    raise ValueError(f'empty candidate {name!r}')
  return tuple(sorted(set(parts), key=lambda n: ALL_SUBSETS.index(parse_subset(n))))


def candidate_subsets(candidate: Candidate) -> List[Subset]:
  return [parse_subset(n) for n in candidate]


def fits(candidate: Candidate, available: Subset) -> bool:
  """True when every subset of the candidate uses only scans of ``available``."""
  return all(all(a or not b for a, b in zip(available, s)) for s in candidate_subsets(candidate))


def ensemble_candidates(available: Subset) -> List[Candidate]:
  """The ensembles ``experiments/subset_selection_eval.py`` scores for an available set: the
  mean over all its sub-subsets (for two scans or more)."""
  subs = sub_subsets(available)
  return [tuple(subset_name(s) for s in subs)] if len(subs) > 1 else []


def all_candidates(ensembles: bool = True) -> List[Candidate]:
  """The 15 single subsets, then (``ensembles``) the 11 all-sub-subset means."""
  out = [(subset_name(s),) for s in ALL_SUBSETS]
  if ensembles:
    out += [c for s in ALL_SUBSETS for c in ensemble_candidates(s)]
  return out


# ----------------------------------------------------------------------------------------------
# Choosing a rule from a table


def table_from_rows(rows) -> Dict[Tuple[str, Candidate, str], float]:
  """{(case, candidate, region): Dice} from per-case rows whose 'subset' names a candidate;
  repeated keys (several runs of one case) are averaged."""
  values = {}
  for row in rows:
    key = (str(row['case']), parse_candidate(row['subset']), row['region'])
    values.setdefault(key, []).append(float(row['dice']))
  return {k: float(np.mean(v)) for k, v in values.items()}


def choose(table, min_gain: float = 0.0, ensembles: bool = True, source=None,
           confidence: Optional[float] = None) -> dict:
  """The rule (see the module doc) from a ``table_from_rows`` table. For each available set
  and region the candidate with the highest mean Dice over the cases that have it and the
  default (all of the available scans) is chosen if its mean gain exceeds ``min_gain``; with
  ``confidence`` (e.g. 0.95) only candidates whose Student-t interval of the per-case gain
  lies above ``min_gain`` compete (a change the table shows outside its noise)."""
  if not table:
    raise ValueError('an empty table: nothing to choose from')
  by_key = {}
  for (case, cand, region), dice in table.items():
    by_key.setdefault((cand, region), {})[case] = dice
  rules, gains = {}, {}
  for available in ALL_SUBSETS:
    name = subset_name(available)
    default = (name,)
    rules[name], gains[name] = {}, {}
    for region in REGIONS:
      base = by_key.get((default, region), {})
      best, best_gain = default, 0.0
      for cand in sorted({c for c, r in by_key if r == region}):
        if cand == default or not fits(cand, available) or (len(cand) > 1 and not ensembles):
          continue
        scores = by_key[(cand, region)]
        cases = [c for c in scores if c in base]
        if not cases:
          continue
        diffs = [scores[c] - base[c] for c in cases]
        gain = float(np.mean(diffs))
        if confidence is not None and not mean_interval(diffs, confidence)[1] > min_gain:
          continue
        if gain > best_gain:
          best, best_gain = cand, gain
      if best_gain <= min_gain:
        best, best_gain = default, 0.0
      rules[name][region] = list(best)
      gains[name][region] = best_gain
  return {'format': FORMAT, 'rules': rules, 'gains': gains,
          'source': dict(source or {}, min_gain=min_gain, ensembles=ensembles,
                         confidence=confidence,
                         num_cases=len({k[0] for k in table}))}


def mean_interval(values, confidence=0.95):
  """(mean, low, high) of the Student-t interval (scipy.stats.t); nan bounds below 2 values."""
  from mstkd_jax.report import mean_interval as interval
  return interval(values, confidence)


def default_rule() -> dict:
  """The rule of prediction without a selection: every region from all available scans."""
  rules = {subset_name(s): {r: [subset_name(s)] for r in REGIONS} for s in ALL_SUBSETS}
  return {'format': FORMAT, 'rules': rules,
          'gains': {n: {r: 0.0 for r in REGIONS} for n in rules}, 'source': {'default': True}}


def validate(rule: dict, where: str = 'selection') -> dict:
  """Checks a loaded rule; raises ValueError naming the file and the field."""
  if not isinstance(rule, dict) or rule.get('format') != FORMAT:
    raise ValueError(f'{where}: not a subset selection (expected "format": "{FORMAT}")')
  rules = rule.get('rules')
  if not isinstance(rules, dict):
    raise ValueError(f'{where}: "rules" must map available subsets to regions')
  for available_name, by_region in rules.items():
    try:
      available = parse_subset(available_name)
    except ValueError as e:
      raise ValueError(f'{where}: rules[{available_name!r}]: {e}') from None
    missing = [r for r in REGIONS if r not in (by_region or {})]
    if missing:
      raise ValueError(f'{where}: rules[{available_name!r}] lacks region(s) {missing}')
    for region in REGIONS:
      try:
        cand = parse_candidate(SEPARATOR.join(by_region[region]))
      except (ValueError, TypeError) as e:
        raise ValueError(f'{where}: rules[{available_name!r}][{region!r}]: {e}') from None
      if not fits(cand, available):
        raise ValueError(f'{where}: rules[{available_name!r}][{region!r}] = {list(cand)} uses '
                         f'scans that {available_name} lacks')
  return rule


def save(rule: dict, path: str):
  validate(rule, path)
  write_json_atomic(path, rule)


def load(path: str) -> dict:
  """A rule from a JSON file (or from ``FILE_NAME`` in a folder such as an export)."""
  if os.path.isdir(path):
    path = os.path.join(path, FILE_NAME)
  try:
    with open(path) as f:
      rule = json.load(f)
  except OSError as e:
    raise ValueError(f'{path}: cannot read the subset selection: {e.strerror}') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON: {e}') from None
  return validate(rule, path)


def load_if_present(folder: str) -> Optional[dict]:
  """The rule of an export folder, or None when it has none."""
  path = os.path.join(folder, FILE_NAME)
  return load(path) if os.path.isfile(path) else None


def rule_for(rule: Optional[dict], available: Subset) -> Dict[str, Candidate]:
  """{region: candidate} for an available set (all of it when ``rule`` is None or silent)."""
  name = subset_name(available)
  by_region = (rule or {}).get('rules', {}).get(name)
  if not by_region:
    return {r: (name,) for r in REGIONS}
  return {r: parse_candidate(SEPARATOR.join(by_region[r])) for r in REGIONS}


# ----------------------------------------------------------------------------------------------
# Applying a rule


def region_scores(probs: np.ndarray) -> np.ndarray:
  """[..., 3] WT / TC / ET scores of [..., >=3] channel probabilities: max over the channels of
  each region (thresholding at 0.5 gives exactly ``metrics.region_masks``)."""
  p = np.asarray(probs, np.float32)
  return np.stack([p[..., :3].max(-1), np.maximum(p[..., 0], p[..., 2]), p[..., 2]], -1)


def compose(region_probs: Dict[str, np.ndarray]) -> np.ndarray:
  """{region: [..., C] probabilities of the candidate chosen for it} -> [..., 4] channels
  (module doc): the regions nested ET in TC in WT by union."""
  et = region_scores(region_probs['ET'])[..., 2]
  tc = np.maximum(region_scores(region_probs['TC'])[..., 1], et)
  wt = np.maximum(region_scores(region_probs['WT'])[..., 0], tc)
  return np.stack([tc, wt, et, 1.0 - wt], -1).astype(np.float32)


def predict(rule: Optional[dict], image: np.ndarray, available: Subset,
            forward: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """The rule applied to one case: ``image`` [..., 4] (absent channels zero), ``available``
  the scans present, ``forward(images [n, ..., 4]) -> probs [n, ..., C]`` the network (called
  once, on every sub-subset the rule needs). Returns [..., C] probabilities."""
  available = tuple(bool(a) for a in available)
  chosen = rule_for(rule, available)
  if set(chosen.values()) == {(subset_name(available),)}:     # no change: one plain forward
    return forward(np.asarray(image)[None])[0]
  needed = sorted({n for c in chosen.values() for n in c},
                  key=lambda n: ALL_SUBSETS.index(parse_subset(n)))
  subsets = [parse_subset(n) for n in needed]
  return combine(chosen, dict(zip(needed, forward(masked_copies(np.asarray(image), subsets)))))


def combine(chosen: Dict[str, Candidate], subset_probs: Dict[str, np.ndarray]) -> np.ndarray:
  """The output of ``predict`` from {region: candidate} and {subset name: probs} of one case
  (the evaluation calls it with all 15 subsets' probabilities at hand)."""
  candidate_probs = {c: np.mean([subset_probs[n] for n in c], axis=0) if len(c) > 1
                     else subset_probs[c[0]] for c in set(chosen.values())}
  if len(candidate_probs) == 1:
    return next(iter(candidate_probs.values()))
  return compose({r: candidate_probs[chosen[r]] for r in REGIONS})


def describe(rule: dict) -> str:
  """The rows of a rule that differ from 'all available scans', one line each."""
  lines = []
  for available, by_region in rule['rules'].items():
    for region in REGIONS:
      cand = by_region[region]
      if cand != [available]:
        gain = rule.get('gains', {}).get(available, {}).get(region)
        lines.append(f'{available:>17} {region}: {candidate_name(cand)}'
                     + (f' (+{100 * gain:.1f} on the table)' if gain else ''))
  return '\n'.join(lines) or 'every region from all available scans (no change)'


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m mstkd_jax.subset_selection',
      description='Choose, per region, which of the available scans to use, from per-case '
      'Dice of held-out cases.')
  parser.add_argument('tables', nargs='+', help='per_case.csv files (case, subset, region, dice)')
  parser.add_argument('--out', required=True, help='the rule, a JSON file')
  parser.add_argument('--min_gain', type=float, default=0.0,
                      help='a candidate must beat all available scans by more (Dice fraction)')
  parser.add_argument('--ensembles', action='store_true',
                      help='also consider ensemble candidates found in the tables')
  args = parser.parse_args(argv)
  from mstkd_jax import report
  rows = []
  try:
    for path in args.tables:
      rows += [r for r in report.read_per_case_csv(path) if r['subset'] != report.TEACHER_SUBSET]
    rule = choose(table_from_rows(rows), args.min_gain, args.ensembles,
                  source={'tables': [os.path.basename(p) for p in args.tables]})
    save(rule, args.out)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(describe(rule))
  print(f'Written: {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
