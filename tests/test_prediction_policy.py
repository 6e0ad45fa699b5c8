"""The best network for the scans at hand: the export carries the teacher and a prediction
policy decided from held-out cases; prediction follows it and says which network it ran."""

import json
import os
import shutil

import numpy as np
import pytest

from mstkd_jax import export
from mstkd_jax import inference
from mstkd_jax import prediction_policy as policy_lib
from mstkd_jax import predict
from mstkd_jax import report
from mstkd_jax import subset_selection
from mstkd_jax.modalities import ALL_SUBSETS, FULL, masked_copies, parse_subset, subset_name
from mstkd_jax.predict import segment
from tests import helpers_eval
from tests.test_predict import write_patient

REGIONS = ('WT', 'TC', 'ET')
FULL_NAME = subset_name(FULL)


def _rows(cases, dice):
  """Per-case rows where ``dice(case index, subset name, region)`` gives each Dice."""
  rows = []
  for i in range(cases):
    for subset in [subset_name(s) for s in ALL_SUBSETS] + [report.TEACHER_SUBSET]:
      for region in REGIONS:
        rows.append({'case': f'C{i}', 'subset': subset, 'region': region,
                     'dice': dice(i, subset, region), 'hd95': 5.0})
  return rows


def _dice(i, subset, region):
  """The student's ET is far better from T1Gd + T2 than from all four; the teacher beats the
  student on all four scans; small per-case noise."""
  noise = 0.01 * ((i * 7 + len(subset)) % 5)
  if subset == report.TEACHER_SUBSET:
    return 0.8 + noise
  if region == 'ET' and subset == 'T1Gd+T2':
    return 0.7 + noise
  if region == 'ET' and subset == FULL_NAME:
    return 0.4 + noise
  return 0.6 + noise


def test_the_policy_follows_the_held_out_evidence():
  policy = policy_lib.decide(_rows(12, _dice), has_teacher=True, choose_scans=True)
  full = policy['full_input']
  assert full['network'] == 'teacher' and full['num_cases'] == 12
  assert full['regions'] == {r: 'teacher' for r in REGIONS}
  assert full['dice']['teacher']['ET'] > full['dice']['student']['ET']
  selection = policy['subset_selection']
  assert selection['applied']
  assert selection['rule']['rules'][FULL_NAME]['ET'] == ['T1Gd+T2']
  assert selection['rule']['rules'][FULL_NAME]['WT'] == [FULL_NAME]
  assert selection['expected'][FULL_NAME]['ET']['dice'] == pytest.approx(0.72, abs=0.03)
  # The per-region choice of scans is off unless asked for, and needs enough cases.
  default = policy_lib.decide(_rows(12, _dice), has_teacher=True)
  assert not default['subset_selection']['applied']
  assert default['subset_selection']['reason'] == policy_lib.SELECTION_OFF
  few = policy_lib.decide(_rows(4, _dice), has_teacher=False, choose_scans=True)
  assert not few['subset_selection']['applied']
  assert 'at least 10' in few['subset_selection']['reason']
  assert few['full_input']['network'] == 'student'
  assert few['full_input']['reason'] == 'no teacher carried'
  worse = policy_lib.decide(_rows(12, lambda i, s, r: 0.3 if s == report.TEACHER_SUBSET
                                  else 0.6), has_teacher=True)
  assert worse['full_input']['regions'] == {r: 'student' for r in REGIONS}
  # Per region: the teacher only where it is ahead.
  mixed = policy_lib.decide(_rows(12, lambda i, s, r: (0.9 if r == 'ET' else 0.2)
                                  if s == report.TEACHER_SUBSET else 0.6), has_teacher=True)
  assert mixed['full_input']['regions'] == {'WT': 'student', 'TC': 'student', 'ET': 'teacher'}
  assert mixed['full_input']['network'] == 'teacher and student'
  assert mixed['full_input']['teacher_minus_student']['ET']['mean'] == pytest.approx(0.3)


def test_plans_for_each_input():
  policy = policy_lib.decide(_rows(12, _dice), has_teacher=True, choose_scans=True)
  plan = policy_lib.plan(policy, FULL, has_teacher=True)
  assert plan.network == 'teacher' and plan.single
  assert plan.scans == {r: FULL_NAME for r in REGIONS}
  # Without its teacher the export's student uses the per-region choice of scans.
  plan = policy_lib.plan(policy, FULL, has_teacher=False)
  assert plan.network == 'student' and plan.scans['ET'] == 'T1Gd+T2'
  assert plan.scans['WT'] == FULL_NAME and not plan.single
  assert plan.expected['ET']['dice'] == pytest.approx(0.72, abs=0.03)
  plan = policy_lib.plan(policy, parse_subset('FLAIR+T1Gd'), has_teacher=True)
  assert plan.network == 'student' and plan.single
  assert policy_lib.plan(policy, FULL, 'student', True).network == 'student'
  with pytest.raises(ValueError, match='trained on all four scans'):
    policy_lib.plan(policy, parse_subset('FLAIR'), 'teacher', True)
  with pytest.raises(ValueError, match='carries no teacher'):
    policy_lib.plan(policy, FULL, 'teacher', False)


@pytest.fixture(scope='module')
def model(exported):
  return predict.load_model(exported)


def test_the_export_carries_both_networks_and_its_policy(exported, model):
  with open(os.path.join(exported, 'manifest.json')) as f:
    assert json.load(f)['extra_networks'] == {'teacher': 'teacher_variables'}
  with open(os.path.join(exported, 'metadata.json')) as f:
    meta = json.load(f)
  assert set(meta['networks']) == {'student', 'teacher'}
  assert set(meta['networks']['teacher']['evaluation']['all_four_scans']) == set(REGIONS)
  assert meta['evaluated_on']['data'] == {'root': None, 'synthetic': True}
  with open(os.path.join(exported, policy_lib.FILE_NAME)) as f:
    saved = json.load(f)
  assert saved['format'] == policy_lib.FORMAT
  assert saved['full_input']['network'] in ('student', 'teacher')
  assert not saved['subset_selection']['applied']          # 2 held-out synthetic cases
  assert model.teacher is not None and model.policy == saved
  # The teacher and the student are different networks.
  image = np.random.RandomState(0).rand(*model.inference.window, 4).astype(np.float32)
  student, _ = inference.box_probabilities(model, image)
  teacher, _ = inference.box_probabilities(model, image, passes=[(model.teacher, None)])
  assert np.abs(student - teacher).max() > 1e-3


def _policy(regions=('teacher', 'teacher', 'teacher'), rule=None):
  """A policy that takes each region (WT, TC, ET) of all four scans from the network named in
  ``regions`` and applies ``rule`` to the student's inputs."""
  return {'format': policy_lib.FORMAT, 'held_out': {},
          'full_input': {'regions': dict(zip(REGIONS, regions)), 'reason': 'test',
                         'num_cases': 12},
          'subset_selection': {'applied': rule is not None, 'reason': 'test', 'rule': rule,
                               'expected': {'FLAIR+T1+T1Gd': {r: {'dice': 0.7, 'num_cases': 12}
                                                              for r in REGIONS}}}}


def test_prediction_runs_the_network_the_policy_names(model, tmp_path, monkeypatch):
  paths = write_patient(str(tmp_path / 'in'), (36, 36, 30), seed=3)
  monkeypatch.setattr(model, 'policy', _policy())
  full = segment.predict_files(model, paths)
  assert full.plan.network == 'teacher'
  monkeypatch.setattr(model, 'policy', _policy(('student',) * 3))
  assert segment.predict_files(model, paths).plan.network == 'student'
  monkeypatch.setattr(model, 'policy', _policy())
  forced = segment.predict_files(model, paths, network='student')
  assert forced.plan.network == 'student'
  assert not np.allclose(full.probabilities, forced.probabilities)
  # The sidecar and the printed summary say which network ran, with its expected accuracy.
  record = predict.outputs.case_record(full, model, 'P1', [])
  assert record['network']['name'] == 'teacher'
  assert record['expected_accuracy']['network'] == 'teacher'
  assert set(record['expected_accuracy']['dice']) == set(REGIONS)
  assert record['expected_accuracy']['dice']['ET'] == pytest.approx(
      model.facts.evaluation['teacher']['ET']['dice'], abs=1e-4)


def test_regions_from_both_networks_are_composed(model, monkeypatch):
  monkeypatch.setattr(model, 'policy', _policy(('student', 'teacher', 'teacher')))
  plan = policy_lib.plan(model.policy, FULL, has_teacher=True)
  assert plan.network == 'teacher and student'
  assert plan.networks == {'WT': 'student', 'TC': 'teacher', 'ET': 'teacher'}
  image = np.random.RandomState(2).rand(*model.inference.window, 4).astype(np.float32)
  composed, _ = segment.network_probabilities(model, image, plan)
  student = model.inference.predict(model.variables, image[None])[0]
  teacher = model.inference.predict(model.teacher, image[None])[0]
  reference = subset_selection.compose({'WT': student, 'TC': teacher, 'ET': teacher})
  np.testing.assert_allclose(composed, reference, atol=1e-6)


def test_the_per_region_rule_composes_the_students_passes(model, monkeypatch):
  rule = subset_selection.default_rule()
  rule['rules']['FLAIR+T1+T1Gd']['ET'] = ['T1Gd']
  rule['rules']['FLAIR+T1+T1Gd']['TC'] = ['FLAIR+T1Gd']
  monkeypatch.setattr(model, 'policy', _policy(('student',) * 3, rule))
  present = parse_subset('FLAIR+T1+T1Gd')
  plan = policy_lib.plan(model.policy, present, has_teacher=True)
  assert plan.scans == {'WT': 'FLAIR+T1+T1Gd', 'TC': 'FLAIR+T1Gd', 'ET': 'T1Gd'}
  assert plan.expected['ET']['dice'] == 0.7
  image = np.random.RandomState(1).rand(*model.inference.window, 4).astype(np.float32)
  image = masked_copies(image, [present])[0]
  composed, _ = segment.network_probabilities(model, image, plan)
  names = ['FLAIR+T1Gd', 'FLAIR+T1+T1Gd', 'T1Gd']
  probs = model.inference.predict(model.variables,
                                  masked_copies(image, [parse_subset(n) for n in names]))
  reference = subset_selection.combine(
      {r: (plan.scans[r],) for r in REGIONS}, dict(zip(names, probs)))
  np.testing.assert_allclose(composed, reference, atol=1e-6)
  # With mirroring the composition is made per mirroring, then averaged.
  mean, disagreement = segment.network_probabilities(model, image, plan, tta=True)
  assert mean.shape == composed.shape and disagreement.shape == image.shape[:3]


def test_an_export_without_the_teacher_still_works(tmp_path_factory, tmp_path, capsys):
  run = helpers_eval.trained_run(tmp_path_factory)
  out = export.export_student(run.config, run.workdir, None, str(tmp_path / 'student_only'),
                              teacher=False)
  assert not os.path.exists(os.path.join(out, 'teacher_variables'))
  paths = write_patient(str(tmp_path / 'in'), (36, 36, 30), seed=3)
  seg = str(tmp_path / 'seg.nii.gz')
  assert predict.main(['--checkpoint', out, '--flair', paths['flair'], '--t1', paths['t1'],
                       '--t1ce', paths['t1ce'], '--t2', paths['t2'], '--out', seg]) == 0
  with open(tmp_path / 'seg.json') as f:
    record = json.load(f)
  assert record['network']['name'] == 'student'
  assert 'network with FLAIR+T1+T1Gd+T2: student' in capsys.readouterr().out
  assert predict.main(['--checkpoint', out, '--flair', paths['flair'], '--t1', paths['t1'],
                       '--t1ce', paths['t1ce'], '--t2', paths['t2'], '--out', seg,
                       '--network', 'teacher']) == 2
  assert 'carries no teacher' in capsys.readouterr().err
  # An export made before the policy and the teacher existed loads as the student alone.
  old = str(tmp_path / 'old')
  shutil.copytree(out, old)
  os.remove(os.path.join(old, policy_lib.FILE_NAME))
  loaded = predict.load_model(old)
  assert loaded.teacher is None and loaded.policy['full_input']['network'] == 'student'
  assert policy_lib.plan(loaded.policy, FULL, has_teacher=False).network == 'student'
