"""Per-region choice of the scans to use at inference (``mstkd_jax.subset_selection``)."""

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from mstkd_jax import metrics, report
from mstkd_jax import subset_selection as sel
from mstkd_jax.modalities import ALL_SUBSETS, FULL, parse_subset, subset_name

ALL4 = 'FLAIR+T1+T1Gd+T2'


def _rows(scores, cases=('a', 'b', 'c')):
  """Per-case rows: every subset scores 0.5 except ``scores[(candidate, region)]``."""
  rows = []
  names = [subset_name(s) for s in ALL_SUBSETS]
  names += [sel.candidate_name(c) for s in ALL_SUBSETS for c in sel.ensemble_candidates(s)]
  for i, case in enumerate(cases):
    for name in names:
      for region in metrics.REGIONS:
        dice = scores.get((name, region), 0.5) + 0.001 * i
        rows.append({'case': case, 'subset': name, 'region': region, 'dice': dice})
  return rows


def test_choose_takes_a_better_sub_subset_only_where_it_is_available():
  table = sel.table_from_rows(_rows({('T1Gd+T2', 'ET'): 0.7, ('T1Gd', 'TC'): 0.52}))
  rule = sel.choose(table, ensembles=False)
  assert rule['rules'][ALL4]['ET'] == ['T1Gd+T2']
  assert rule['rules'][ALL4]['WT'] == [ALL4]                 # nothing better: all four
  assert rule['rules']['FLAIR+T1Gd+T2']['ET'] == ['T1Gd+T2']
  assert rule['rules']['FLAIR+T1Gd']['ET'] == ['FLAIR+T1Gd']   # T2 missing: not a candidate
  assert rule['gains'][ALL4]['ET'] == pytest.approx(0.2)
  assert rule['rules'][ALL4]['TC'] == ['T1Gd']
  # A margin keeps the small gain out.
  strict = sel.choose(table, min_gain=0.05, ensembles=False)
  assert strict['rules'][ALL4]['TC'] == [ALL4] and strict['rules'][ALL4]['ET'] == ['T1Gd+T2']
  for available, by_region in rule['rules'].items():
    for cand in by_region.values():
      assert sel.fits(tuple(cand), parse_subset(available))
  assert rule['source']['num_cases'] == 3


def test_confidence_keeps_only_gains_outside_the_noise():
  rows = _rows({('T1Gd+T2', 'ET'): 0.7})
  for r in rows:                       # T2 alone: better on average, but on one case only
    if r['subset'] == 'T2' and r['region'] == 'WT':
      r['dice'] = 0.95 if r['case'] == 'a' else 0.45
  table = sel.table_from_rows(rows)
  assert sel.choose(table, ensembles=False)['rules']['T1Gd+T2']['WT'] == ['T2']
  strict = sel.choose(table, ensembles=False, confidence=0.95)
  assert strict['rules']['T1Gd+T2']['WT'] == ['T1Gd+T2']
  assert strict['rules'][ALL4]['ET'] == ['T1Gd+T2']      # steady over the cases: kept
  assert strict['source']['confidence'] == 0.95


def test_ensembles_are_candidates_only_when_asked():
  ens = sel.candidate_name(sel.ensemble_candidates(FULL)[0])
  table = sel.table_from_rows(_rows({(ens, 'WT'): 0.8}))
  assert sel.choose(table, ensembles=False)['rules'][ALL4]['WT'] == [ALL4]
  chosen = sel.choose(table, ensembles=True)['rules'][ALL4]['WT']
  assert len(chosen) == 15 and ALL4 in chosen


def test_compose_nests_the_regions():
  rs = np.random.RandomState(0)
  probs = {r: rs.rand(6, 6, 6, 4).astype(np.float32) for r in metrics.REGIONS}
  out = sel.compose(probs)
  got = metrics.region_masks(out)
  regions = {r: metrics.region_masks(p) for r, p in probs.items()}
  et = regions['ET']['ET']
  tc = regions['TC']['TC'] | et
  wt = regions['WT']['WT'] | tc
  np.testing.assert_array_equal(got['ET'], et)
  np.testing.assert_array_equal(got['TC'], tc)
  np.testing.assert_array_equal(got['WT'], wt)
  np.testing.assert_allclose(out[..., 3], 1.0 - out[..., 1])


class Forward:
  """A fake network: the probabilities depend on which channels are present."""

  def __init__(self):
    self.calls = []

  def __call__(self, images):
    images = np.asarray(images)
    self.calls.append(images.copy())
    present = (np.abs(images).reshape(len(images), -1, 4).sum(1) > 0).astype(np.float32)
    out = np.zeros(images.shape[:-1] + (4,), np.float32)
    for i, p in enumerate(present):
      out[i] = 0.1 + 0.2 * p                 # channel c on where modality c is present
    return out


def test_predict_without_a_rule_is_one_plain_forward():
  image = np.random.RandomState(1).rand(4, 4, 4, 4).astype(np.float32) + 0.1
  image[..., 1] = 0.0
  available = (True, False, True, True)
  forward = Forward()
  out = sel.predict(None, image, available, forward)
  assert len(forward.calls) == 1 and forward.calls[0].shape == (1, 4, 4, 4, 4)
  np.testing.assert_array_equal(forward.calls[0][0], image)
  np.testing.assert_array_equal(out, forward(image[None])[0])
  np.testing.assert_array_equal(sel.predict(sel.default_rule(), image, available, Forward()),
                                out)


def test_predict_applies_the_rule():
  image = np.random.RandomState(2).rand(4, 4, 4, 4).astype(np.float32) + 0.1
  rule = sel.default_rule()
  rule['rules'][ALL4] = {'WT': [ALL4], 'TC': ['T1Gd+T2'], 'ET': ['T1Gd', 'T1Gd+T2']}
  sel.validate(rule)
  forward = Forward()
  out = sel.predict(rule, image, FULL, forward)
  assert len(forward.calls) == 1
  fed = forward.calls[0]
  assert fed.shape[0] == 3                              # T1Gd, T1Gd+T2, all four
  np.testing.assert_array_equal(fed[0][..., [0, 1, 3]], 0.0)
  np.testing.assert_array_equal(fed[0][..., 2], image[..., 2])
  probs = dict(zip(['T1Gd', 'T1Gd+T2', ALL4], Forward()(fed)))
  expected = sel.compose({'WT': probs[ALL4], 'TC': probs['T1Gd+T2'],
                          'ET': (probs['T1Gd'] + probs['T1Gd+T2']) / 2})
  np.testing.assert_allclose(out, expected)
  # One candidate for every region: its probabilities unchanged (no composition).
  rule['rules'][ALL4] = {r: ['T1Gd+T2'] for r in metrics.REGIONS}
  np.testing.assert_array_equal(sel.predict(rule, image, FULL, Forward()), probs['T1Gd+T2'])


def test_save_load_and_bad_rules(tmp_path):
  rule = sel.choose(sel.table_from_rows(_rows({('T2', 'WT'): 0.9})))
  sel.save(rule, str(tmp_path / sel.FILE_NAME))
  assert sel.load(str(tmp_path)) == json.loads((tmp_path / sel.FILE_NAME).read_text())
  assert sel.load_if_present(str(tmp_path / 'nothing')) is None
  bad = json.loads(json.dumps(rule))
  bad['rules']['FLAIR']['ET'] = ['T1Gd']
  with pytest.raises(ValueError, match=r"rules\['FLAIR'\]\['ET'\].*lacks"):
    sel.validate(bad, 'x.json')
  bad = json.loads(json.dumps(rule))
  del bad['rules']['T2']['TC']
  with pytest.raises(ValueError, match='lacks region'):
    sel.validate(bad)
  with pytest.raises(ValueError, match='format'):
    sel.validate({'rules': {}})
  (tmp_path / 'broken.json').write_text('{')
  with pytest.raises(ValueError, match='broken.json: not valid JSON'):
    sel.load(str(tmp_path / 'broken.json'))


def test_command_line(tmp_path):
  rows = [dict(r, hd95=1.0) for r in _rows({('T1Gd+T2', 'ET'): 0.8})
          if sel.SEPARATOR not in r['subset']]
  report.write_per_case_csv(rows, str(tmp_path / 'per_case.csv'))
  out = io.StringIO()
  with redirect_stdout(out):
    assert sel.main([str(tmp_path / 'per_case.csv'), '--out', str(tmp_path / 'rule.json')]) == 0
  assert f'{ALL4} ET: T1Gd+T2' in out.getvalue()
  assert sel.load(str(tmp_path / 'rule.json'))['rules'][ALL4]['ET'] == ['T1Gd+T2']
  err = io.StringIO()
  with redirect_stderr(err):
    assert sel.main([str(tmp_path / 'none.csv'), '--out', str(tmp_path / 'r.json')]) == 2
  assert err.getvalue().startswith('error: ')
