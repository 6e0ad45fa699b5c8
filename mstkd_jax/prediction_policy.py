"""Which network, and which of a patient's scans, prediction uses: decided from held-out cases.

A run trains two networks of the same size: the teacher on all four scans, the student on
random subsets. A patient with all four scans can get a worse segmentation from the student
than from the teacher, or than from some of their scans (experiments/RESULTS_quality.md). The
*prediction policy* of an export says, from the run's own held-out evaluation (cases that did
not train the networks, ``<workdir>/eval/per_case.csv``):

* ``full_input``: for a patient with all four scans, the teacher when the export carries it
  and its held-out mean Dice (WT, TC, ET averaged) is at least the student's on all four scans,
  else the student;
* ``subset_selection``: for the other inputs, a per-region choice of scans
  (``subset_selection.choose`` on single subsets, kept only where the per-case gain's 95 %
  interval lies above 0), applied only when the evaluation has at least ``MIN_SELECTION_CASES``
  cases; otherwise off, with the reason.

Every decision carries its evidence (cases, Dice of each option) and what a user is promised
for each input (``expected``). ``plan(policy, present)`` turns the policy into what to run
for one patient. The file: ``prediction_policy.json`` in an export (``FORMAT``).
"""

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from mstkd_jax import report
from mstkd_jax import subset_selection
from mstkd_jax.fileio import write_json_atomic
from mstkd_jax.metrics import REGIONS
from mstkd_jax.modalities import FULL, subset_name

FORMAT = 'mstkd-prediction-policy/1'
FILE_NAME = 'prediction_policy.json'
# A per-region choice of scans is carried only when held out cases are at least this many.
MIN_SELECTION_CASES = 10
CONFIDENCE = 0.95
FULL_NAME = subset_name(FULL)


def _means(rows, subset):
  """({region: mean Dice}, {region: {case: Dice}}) of the rows of one subset name."""
  by_region = {}
  for row in rows:
    if row['subset'] == subset:
      by_region.setdefault(row['region'], {})[str(row['case'])] = float(row['dice'])
  return {r: float(np.mean(list(v.values()))) for r, v in by_region.items()}, by_region


def decide_full_input(rows, has_teacher):
  """The network for all four scans (module doc), with its evidence."""
  if not has_teacher:
    return {'network': 'student', 'reason': 'no teacher carried'}
  _, teacher = _means(rows, report.TEACHER_SUBSET)
  _, student = _means(rows, FULL_NAME)
  cases = sorted(set.intersection(*[set(teacher.get(r, {})) & set(student.get(r, {}))
                                    for r in REGIONS]))
  if not cases:
    return {'network': 'student', 'reason': 'no held-out evaluation of the teacher on all '
                                            'four scans'}
  evidence = {name: {r: float(np.mean([table[r][c] for c in cases])) for r in REGIONS}
              for name, table in (('teacher', teacher), ('student', student))}
  diffs = [np.mean([teacher[r][c] - student[r][c] for r in REGIONS]) for c in cases]
  mean, low, high = report.mean_interval(diffs, CONFIDENCE)
  use_teacher = mean >= 0
  return {'network': 'teacher' if use_teacher else 'student',
          'reason': (f'on {len(cases)} held-out case(s) with all four scans the teacher\'s mean '
                     f'Dice is {"at least" if use_teacher else "below"} the student\'s '
                     f'({100 * mean:+.1f} points)'),
          'num_cases': len(cases), 'dice': evidence,
          'teacher_minus_student': {'mean': mean, 'low': low, 'high': high}}


def decide_selection(rows, min_cases=MIN_SELECTION_CASES):
  """The per-region choice of scans for partial inputs (module doc), with its evidence and
  the expected Dice of each changed input."""
  student = [r for r in rows if r['subset'] != report.TEACHER_SUBSET]
  cases = sorted({str(r['case']) for r in student})
  if len(cases) < min_cases:
    return {'applied': False, 'num_cases': len(cases), 'rule': None, 'expected': {},
            'reason': f'{len(cases)} held-out case(s): a per-region choice of scans needs at '
                      f'least {min_cases}'}
  table = subset_selection.table_from_rows(student)
  rule = subset_selection.choose(table, min_gain=0.0, ensembles=False, confidence=CONFIDENCE,
                                 source={'held_out_cases': len(cases)})
  expected = {}
  for available, by_region in rule['rules'].items():
    if any(by_region[r] != [available] for r in REGIONS):
      expected[available] = {
          r: {'dice': float(np.mean([table[(c, tuple(by_region[r]), r)] for c in cases
                                     if (c, tuple(by_region[r]), r) in table])),
              'num_cases': len(cases), 'scans': by_region[r][0]} for r in REGIONS}
  if not expected:
    return {'applied': False, 'num_cases': len(cases), 'rule': None, 'expected': {},
            'reason': f'on {len(cases)} held-out cases no choice of fewer scans beats all '
                      'available scans outside the noise'}
  return {'applied': True, 'num_cases': len(cases), 'rule': rule, 'expected': expected,
          'reason': f'on {len(cases)} held-out cases fewer scans beat all available scans for '
                    f'{len(expected)} input(s), outside the noise (95 % interval above 0)'}


def decide(rows, has_teacher, min_cases=MIN_SELECTION_CASES, held_out=None):
  """The policy from per-case rows (``report.read_per_case_csv``) of held-out cases."""
  return {'format': FORMAT, 'held_out': dict(held_out or {}),
          'full_input': decide_full_input(rows, has_teacher),
          'subset_selection': decide_selection(rows, min_cases)}


def student_only():
  """The policy of a model without held-out evidence: the student on every scan given."""
  reason = 'no held-out evaluation recorded'
  return {'format': FORMAT, 'held_out': {},
          'full_input': {'network': 'student', 'reason': reason},
          'subset_selection': {'applied': False, 'reason': reason, 'rule': None,
                               'expected': {}}}


def from_workdir(workdir, has_teacher):
  """The policy of a training workdir, from its test evaluation (``eval/per_case.csv``)."""
  path = os.path.join(workdir, 'eval', 'per_case.csv')
  if not os.path.isfile(path):
    return student_only()
  summary = {}
  try:
    with open(os.path.join(workdir, 'eval', 'summary.json')) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    pass
  held_out = {k: summary[k] for k in ('split', 'source') if k in summary}
  return decide(report.read_per_case_csv(path), has_teacher, held_out=held_out)


def write(policy, folder):
  write_json_atomic(os.path.join(folder, FILE_NAME), policy, indent=2)


def read(location, has_teacher):
  """The policy of an export (its ``prediction_policy.json``; exports made before it: the
  student alone) or of a training workdir (decided from its evaluation)."""
  path = os.path.join(location, FILE_NAME)
  if os.path.isfile(path):
    with open(path) as f:
      policy = json.load(f)
    if policy.get('format') != FORMAT:
      raise ValueError(f'{path}: not a prediction policy (expected "format": "{FORMAT}")')
    subset_selection.validate(policy['subset_selection']['rule'] or
                              subset_selection.default_rule(), path)
    return policy
  if os.path.isfile(os.path.join(location, 'manifest.json')):
    return student_only()
  return from_workdir(location, has_teacher)


@dataclasses.dataclass
class Plan:
  """What runs for one patient: ``network`` ('student' / 'teacher'), ``scans`` {region:
  subset name(s) the student's output for it comes from} (None: all given scans), ``reason``
  (one line), ``expected`` {region: {'dice', ...}} of the held-out evidence (None: the
  standard 15-subset evaluation applies)."""
  network: str
  scans: Optional[dict]
  reason: str
  expected: Optional[dict] = None


def plan(policy, present, network='auto', has_teacher=False) -> Plan:
  """The plan for a patient with scans ``present`` (4 booleans); ``network`` 'auto' follows
  ``policy``, 'student' runs the student on every scan given, 'teacher' the teacher (all four
  scans only)."""
  present = tuple(bool(p) for p in present)
  name = subset_name(present)
  if network == 'teacher':
    if not has_teacher:
      raise ValueError('--network teacher: this model carries no teacher')
    if present != FULL:
      raise ValueError(f'--network teacher: the teacher was trained on all four scans; this '
                       f'patient has {name}')
    return Plan('teacher', None, 'asked for (--network teacher)')
  if network == 'student':
    return Plan('student', None, 'asked for (--network student): every scan given')
  full = (policy or {}).get('full_input', {})
  if present == FULL and full.get('network') == 'teacher' and has_teacher:
    expected = {r: {'dice': full['dice']['teacher'][r], 'num_cases': full['num_cases']}
                for r in REGIONS}
    return Plan('teacher', None, full['reason'], expected)
  selection = (policy or {}).get('subset_selection', {})
  chosen = subset_selection.rule_for(selection.get('rule') if selection.get('applied')
                                     else None, present)
  if any(c != (name,) for c in chosen.values()):
    scans = {r: subset_selection.candidate_name(c) for r, c in chosen.items()}
    return Plan('student', scans, 'per region the scans that scored best on held-out cases '
                '(' + ', '.join(f'{r} from {s}' for r, s in scans.items()) + ')',
                selection['expected'].get(name))
  why = full.get('reason') if present == FULL and full.get('network') != 'teacher' else None
  return Plan('student', None, why or 'every scan given')
