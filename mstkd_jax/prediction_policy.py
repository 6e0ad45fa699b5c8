"""Which network, and which of a patient's scans, prediction uses: decided from held-out cases.

A run trains two networks of the same size: the teacher on all four scans, the student on
random subsets. A patient with all four scans can get a worse segmentation from the student
than from the teacher, or than from some of their scans (experiments/RESULTS_quality.md). The
*prediction policy* of an export says, from the run's own held-out evaluation (cases that did
not train the networks, ``<workdir>/eval/per_case.csv``):

* ``full_input``: for a patient with all four scans, per region (WT, TC, ET), the teacher when
  the export carries it and its held-out mean Dice for that region is at least the student's
  on all four scans, else the student; regions from both networks are composed nested (ET
  within TC within WT, ``subset_selection.compose``);
* ``subset_selection``: a per-region choice of scans for the student
  (``subset_selection.choose`` on single subsets, kept only where the per-case gain's 95 %
  interval lies above 0, and only with at least ``MIN_SELECTION_CASES`` held-out cases). Off
  unless the export asks for it (``--export_scan_choice``): cross-fitted over 5 folds it did
  not pay (``SELECTION_OFF``).

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
  """Per region, the network for all four scans (module doc), with its evidence."""
  student_only_ = lambda reason: {'network': 'student', 'regions': {r: 'student' for r in REGIONS},
                                  'reason': reason}
  if not has_teacher:
    return student_only_('no teacher carried')
  _, teacher = _means(rows, report.TEACHER_SUBSET)
  _, student = _means(rows, FULL_NAME)
  cases = sorted(set.intersection(*[set(teacher.get(r, {})) & set(student.get(r, {}))
                                    for r in REGIONS]))
  if not cases:
    return student_only_('no held-out evaluation of the teacher on all four scans')
  evidence = {name: {r: float(np.mean([table[r][c] for c in cases])) for r in REGIONS}
              for name, table in (('teacher', teacher), ('student', student))}
  differences, regions = {}, {}
  for r in REGIONS:
    mean, low, high = report.mean_interval([teacher[r][c] - student[r][c] for c in cases],
                                           CONFIDENCE)
    differences[r] = {'mean': mean, 'low': low, 'high': high}
    regions[r] = 'teacher' if mean >= 0 else 'student'
  teacher_regions = [r for r in REGIONS if regions[r] == 'teacher']
  network = ('teacher' if len(teacher_regions) == len(REGIONS) else
             'student' if not teacher_regions else 'teacher and student')
  return {'network': network, 'regions': regions,
          'reason': (f'on {len(cases)} held-out case(s) with all four scans, per region the '
                     'network with the higher mean Dice: ' + ', '.join(
                         f'{r} {regions[r]} ({100 * differences[r]["mean"]:+.1f} points for the '
                         'teacher)' for r in REGIONS)),
          'num_cases': len(cases), 'dice': evidence, 'teacher_minus_student': differences}


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


SELECTION_OFF = ('off by default: cross-fitted on 5 folds of BraTS 2018 cases it raised no '
                 'partial input\'s Dice outside the noise (experiments/RESULTS_quality.md); '
                 '--export_scan_choice carries it')


def decide(rows, has_teacher, choose_scans=False, min_cases=MIN_SELECTION_CASES,
           held_out=None):
  """The policy from per-case rows (``report.read_per_case_csv``) of held-out cases; the
  per-region choice of scans only with ``choose_scans``."""
  selection = (decide_selection(rows, min_cases) if choose_scans else
               {'applied': False, 'rule': None, 'expected': {}, 'reason': SELECTION_OFF})
  return {'format': FORMAT, 'held_out': dict(held_out or {}),
          'full_input': decide_full_input(rows, has_teacher), 'subset_selection': selection}


def student_only():
  """The policy of a model without held-out evidence: the student on every scan given."""
  reason = 'no held-out evaluation recorded'
  return {'format': FORMAT, 'held_out': {},
          'full_input': {'network': 'student', 'regions': {r: 'student' for r in REGIONS},
                         'reason': reason},
          'subset_selection': {'applied': False, 'reason': reason, 'rule': None,
                               'expected': {}}}


def from_workdir(workdir, has_teacher, choose_scans=False):
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
  return decide(report.read_per_case_csv(path), has_teacher, choose_scans, held_out=held_out)


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
  """What runs for one patient: ``sources`` {region: (network 'student' / 'teacher', the
  scans its output for that region comes from: a subset name, or several joined by '|' whose
  outputs are averaged)}, ``reason`` (one line) and ``expected`` {region: {'dice', ...}} of
  the held-out evidence for a per-region choice of scans (None otherwise)."""
  sources: dict
  reason: str
  expected: Optional[dict] = None

  @property
  def network(self):
    """'student', 'teacher', or 'teacher and student' (regions from both)."""
    names = {net for net, _ in self.sources.values()}
    return names.pop() if len(names) == 1 else 'teacher and student'

  @property
  def networks(self):
    return {r: net for r, (net, _) in self.sources.items()}

  @property
  def scans(self):
    return {r: scans for r, (_, scans) in self.sources.items()}

  @property
  def single(self):
    """True when one network on one input gives every region (no composition)."""
    return len(set(self.sources.values())) == 1


def plan(policy, present, network='auto', has_teacher=False) -> Plan:
  """The plan for a patient with scans ``present`` (4 booleans); ``network`` 'auto' follows
  ``policy``, 'student' runs the student on every scan given, 'teacher' the teacher (all four
  scans only)."""
  present = tuple(bool(p) for p in present)
  name = subset_name(present)
  every = lambda net: {r: (net, name) for r in REGIONS}
  if network == 'teacher':
    if not has_teacher:
      raise ValueError('--network teacher: this model carries no teacher')
    if present != FULL:
      raise ValueError(f'--network teacher: the teacher was trained on all four scans; this '
                       f'patient has {name}')
    return Plan(every('teacher'), 'asked for (--network teacher)')
  if network == 'student':
    return Plan(every('student'), 'asked for (--network student): every scan given')
  full = (policy or {}).get('full_input', {})
  selection = (policy or {}).get('subset_selection', {})
  chosen = subset_selection.rule_for(selection.get('rule') if selection.get('applied')
                                     else None, present)
  sources = {r: ('student', subset_selection.candidate_name(c)) for r, c in chosen.items()}
  reasons = []
  if any(c != (name,) for c in chosen.values()):
    reasons.append('scans per region from held-out cases')
  expected = selection.get('expected', {}).get(name)
  if present == FULL and has_teacher:
    for region, net in (full.get('regions') or {}).items():
      if net == 'teacher':
        sources[region] = ('teacher', name)
    reasons.insert(0, full.get('reason', ''))
  elif present == FULL:
    reasons.insert(0, full.get('reason', ''))
  return Plan(sources, '; '.join(r for r in reasons if r) or 'every scan given', expected)
