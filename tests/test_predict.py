"""Prediction on new patients: output geometry for inputs larger than, equal to and smaller than
the model's input and for every modality subset, label conventions, probabilities, the folder
mode, the figure, and every error the command reports."""

import csv
import json
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from mstkd_jax import inference
from mstkd_jax import metrics as metrics_lib
from mstkd_jax import model_facts
from mstkd_jax import predict
from mstkd_jax import regrid
from mstkd_jax import visualize
from mstkd_jax.data import layouts, pipeline
from mstkd_jax.modalities import ALL_SUBSETS, subset_name
from tests import helpers_eval

KEYS_2021 = ('flair', 't1', 't1ce', 't2')
KEYS_2024 = ('t2f', 't1n', 't1c', 't2w')


@pytest.fixture(scope='module')
def model(exported):
  return predict.load_model(exported)


def oblique_affine(zooms=(1.0, 1.2, 2.0)):
  angle = 0.2
  rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                  [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag(zooms)
  affine[:3, 3] = (-40.0, 25.0, -12.5)
  return affine


def write_patient(folder, shape, case_id='P1', layout='brats2021', affine=None, seed=0,
                  keys=None, shapes=None):
  """A case folder with a brain filling ~90 % of `shape` and a bright lesion; returns
  {key: path}. `shapes`/`affine` per key can differ (for the error tests)."""
  os.makedirs(folder, exist_ok=True)
  rs = np.random.RandomState(seed)
  sep, all_keys = ('_', KEYS_2021) if layout == 'brats2021' else ('-', KEYS_2024)
  paths = {}
  for c, key in enumerate(all_keys):
    if keys is not None and key not in keys:
      continue
    s = tuple(shapes[key]) if shapes and key in shapes else tuple(shape)
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / (0.45 * n) for n in s], indexing='ij')
    r = np.sqrt(sum(g ** 2 for g in grid))
    data = np.where(r < 1, 200 + 50 * c + rs.randint(0, 40, s), 0)
    data[(r < 0.35) & (grid[0] > 0)] += 300
    img = nib.Nifti1Image(data.astype(np.int16), None)
    aff = affine[key] if isinstance(affine, dict) else (
        oblique_affine() if affine is None else affine)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=2)
    img.header['descrip'] = b'mstkd test volume'
    img.header.set_xyzt_units('mm', 'sec')
    path = os.path.join(folder, f'{case_id}{sep}{key}.nii.gz')
    nib.save(img, path)
    paths[key] = path
  return paths


def assert_same_geometry(out_path, ref_path, channels=None):
  out, ref = nib.load(out_path), nib.load(ref_path)
  expected = ref.shape + ((channels,) if channels else ())
  assert out.shape == expected
  np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
  np.testing.assert_allclose(out.header.get_qform(), ref.header.get_qform(), atol=1e-5)
  np.testing.assert_allclose(out.header.get_sform(), ref.header.get_sform(), atol=1e-5)
  assert int(out.header['qform_code']) == int(ref.header['qform_code'])
  assert int(out.header['sform_code']) == int(ref.header['sform_code'])
  np.testing.assert_allclose(out.header.get_zooms()[:3], ref.header.get_zooms()[:3])
  assert out.header['descrip'] == ref.header['descrip']


@pytest.mark.parametrize('name,shape', [('larger', (48, 40, 36)), ('equal', (32, 32, 32)),
                                        ('smaller', (24, 28, 20))])
def test_geometry_for_every_subset(model, tmp_path, name, shape):
  paths = write_patient(str(tmp_path / 'in'), shape, seed=len(name))
  window = tuple(model.config.data.input_shape)
  for subset in ALL_SUBSETS:
    given = {k: p for k, p, on in zip(KEYS_2021, paths.values(), subset) if on}
    prediction = predict.predict_files(model, given)
    assert prediction.present == subset
    out = str(tmp_path / f'seg_{"".join("1" if s else "0" for s in subset)}.nii.gz')
    predict.write_prediction(prediction, out)
    assert_same_geometry(out, paths['flair'])
    labels = np.asarray(nib.load(out).dataobj)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    # Outside the box the model saw, everything is background.
    seen = pipeline.restore_geometry(np.ones(prediction.meta['box_size'], np.float32),
                                     prediction.meta, order=0)
    assert not labels[seen == 0].any()
    outside = prediction.probabilities[seen == 0]
    assert (outside[:, :3] == 0).all() and (outside[:, 3] == 1).all()
  box = tuple(prediction.meta['box_size'])
  if name == 'larger':
    assert box[0] > window[0]          # several windows were blended
    assert (seen == 0).any()           # and part of the volume lies outside the box
  else:
    assert box == window


def test_cli_aliases_probabilities_and_label_conventions(exported, tmp_path):
  paths = write_patient(str(tmp_path / 'in'), (40, 36, 34), seed=3)
  out = str(tmp_path / 'seg.nii.gz')
  rc = predict.main(['--checkpoint', exported, '--flair', paths['flair'], '--t1ce',
                     paths['t1ce'], '--out', out, '--save-probabilities'])
  assert rc == 0
  assert_same_geometry(out, paths['flair'])
  probs_path = str(tmp_path / 'seg_probs.nii.gz')
  assert_same_geometry(probs_path, paths['flair'], channels=4)
  probs = np.asarray(nib.load(probs_path).dataobj)
  assert probs.dtype == np.float32 and probs.min() >= 0 and probs.max() <= 1 + 1e-6
  labels = np.asarray(nib.load(out).dataobj)
  # The written labels are the thresholded probabilities, innermost region first.
  np.testing.assert_array_equal(labels, predict.probs_to_labels(probs, 'brats2021'))
  out24 = str(tmp_path / 'seg24.nii.gz')
  assert predict.main(['--checkpoint', exported, '--flair', paths['flair'], '--t1ce',
                       paths['t1ce'], '--out', out24, '--labels', 'brats2024']) == 0
  labels24 = np.asarray(nib.load(out24).dataobj)
  assert set(np.unique(labels24)) <= {0, 1, 2, 3}
  np.testing.assert_array_equal(labels24, np.where(labels == 4, 3, labels))


def test_label_precedence_preserves_the_regions():
  rs = np.random.RandomState(0)
  probs = rs.rand(12, 10, 8, 4).astype(np.float32)
  channels = metrics_lib.region_masks(probs)
  for layout in ('brats2021', 'brats2024'):
    labels = predict.probs_to_labels(probs, layout)
    back = layouts.region_masks(layouts.labels_to_codes(labels, layout))
    for region in ('WT', 'TC', 'ET'):
      np.testing.assert_array_equal(back[region], channels[region])


def test_label_convention_from_file_names(model):
  """Without a recorded convention (a model exported before it was recorded, trained on a real
  root with layout 'auto'), the file names decide, for the whole run."""
  config = model.config.copy_and_resolve_references()
  config.data.root = '/data'
  unknown = predict.Model(config, None, None, 'test', model_facts.ModelFacts(None, '-', None))
  assert predict.resolve_labels('auto', unknown, ['/x/BraTS-GLI-00001-000-t2f.nii.gz']).layout \
      == 'brats2024'
  assert predict.resolve_labels('auto', unknown, ['/x/Brats18_1_flair.nii.gz']).layout \
      == 'brats2021'
  assert predict.resolve_labels('auto', unknown, ['/x/a.nii.gz'], ['flair']).layout == \
      'brats2021'
  assert predict.resolve_labels('brats2024', unknown, ['/x/Brats18_1_flair.nii.gz']).layout \
      == 'brats2024'
  # Cases of one run whose names disagree: an error, never one convention per case.
  with pytest.raises(predict.PredictionError, match='names follow both.*--labels'):
    predict.resolve_labels('auto', unknown, {'A': ['/x/A-t2f.nii.gz'],
                                             'B': ['/x/B_flair.nii.gz']})


def test_the_recorded_convention_wins_over_file_names(model):
  # The shared model trained on synthetic brats2021 cases; the record says so.
  assert model.facts.label_convention == 'brats2021'
  choice = predict.resolve_labels('auto', model, ['/x/BraTS-GLI-00001-000-t2f.nii.gz'])
  assert choice.layout == 'brats2021'
  assert choice.source == 'the convention of its training cases (4 brats2021)'
  mixed = predict.Model(model.config, None, None, 'test',
                        model_facts.ModelFacts('mixed', 'the convention of its training cases', None))
  with pytest.raises(predict.PredictionError, match='both label conventions.*--labels'):
    predict.resolve_labels('auto', mixed, ['/x/a_flair.nii.gz'])
  assert predict.resolve_labels('brats2024', mixed, []).layout == 'brats2024'


def test_export_records_the_convention_and_the_evaluation(exported):
  with open(os.path.join(exported, 'preprocessing.json')) as f:
    settings = json.load(f)
  assert settings['label_convention'] == 'brats2021' and settings['layout'] == 'brats2021'
  assert settings['config_layout'] == 'auto'
  with open(os.path.join(exported, 'evaluation.json')) as f:
    evaluation = json.load(f)
  assert evaluation['split'] == 'test' and evaluation['num_cases'] >= 1
  assert set(evaluation['subsets']) == {subset_name(s) for s in ALL_SUBSETS}
  assert 0.0 <= evaluation['subsets']['FLAIR+T1Gd']['ET']['dice'] <= 1.0


def test_folder_mode_one_convention_sidecars_and_volumes(exported, tmp_path, capsys):
  root = tmp_path / 'cases'
  write_patient(str(root / 'BraTS-GLI-00001-000'), (36, 36, 30), 'BraTS-GLI-00001-000',
                layout='brats2024', keys=('t2f', 't1c'))
  write_patient(str(root / 'Brats18_X_1'), (36, 36, 30), 'Brats18_X_1', seed=1)
  out = tmp_path / 'segs'
  assert predict.main(['--checkpoint', exported, '--input-dir', str(root), '--out',
                       str(out)]) == 0
  captured = capsys.readouterr()
  assert sorted(os.listdir(out)) == ['BraTS-GLI-00001-000.json', 'BraTS-GLI-00001-000.nii.gz',
                                     'Brats18_X_1.json', 'Brats18_X_1.nii.gz', 'volumes.csv']
  # One convention for the run, the model's, whatever the files are called; said once.
  for case in ('BraTS-GLI-00001-000', 'Brats18_X_1'):
    assert set(np.unique(nib.load(str(out / f'{case}.nii.gz')).dataobj)) <= {0, 1, 2, 4}
  assert ('brats2021 labels (1 NCR, 2 ED, 4 ET), by the convention of its training cases '
          '(4 brats2021)') in captured.out
  with open(out / 'BraTS-GLI-00001-000.json') as f:
    record = json.load(f)
  assert record['labels']['convention'] == 'brats2021'
  assert record['labels']['values'] == {'NCR': 1, 'ED': 2, 'ET': 4}
  assert record['modalities_used'] == 'FLAIR+T1Gd'
  assert record['modalities_missing'] == ['T1', 'T2']
  assert record['expected_accuracy']['modalities'] == 'FLAIR+T1Gd'
  assert set(record['expected_accuracy']['dice']) == {'WT', 'TC', 'ET'}
  assert 'expected accuracy with FLAIR+T1Gd: Dice WT / TC / ET' in captured.out
  # Volumes: voxel counts of the written labels times the voxel volume (oblique_affine's
  # zooms 1.0 x 1.2 x 2.0 mm = 2.4 uL).
  labels = np.asarray(nib.load(str(out / 'BraTS-GLI-00001-000.nii.gz')).dataobj)
  assert record['voxel_volume_ml'] == pytest.approx(0.0024)
  assert record['volumes_ml']['WT'] == pytest.approx(np.count_nonzero(labels) * 0.0024,
                                                     abs=1e-3)
  assert record['volumes_ml']['ET'] == pytest.approx(np.count_nonzero(labels == 4) * 0.0024,
                                                     abs=1e-3)
  assert record['volumes_ml']['TC'] == pytest.approx(
      np.count_nonzero(np.isin(labels, (1, 4))) * 0.0024, abs=1e-3)
  with open(out / 'volumes.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['case_id'] for r in rows] == ['BraTS-GLI-00001-000', 'Brats18_X_1']
  assert float(rows[0]['WT_ml']) == pytest.approx(record['volumes_ml']['WT'])
  assert rows[1]['modalities_used'] == 'FLAIR+T1+T1Gd+T2'
  assert {'NCR_ml', 'ED_ml', 'ET_ml', 'dice_expected_ET'} <= set(rows[0])
  # --labels overrides for the whole run.
  out24 = tmp_path / 'segs24'
  assert predict.main(['--checkpoint', exported, '--input-dir', str(root), '--out',
                       str(out24), '--labels', 'brats2024']) == 0
  for case in ('BraTS-GLI-00001-000', 'Brats18_X_1'):
    assert set(np.unique(nib.load(str(out24 / f'{case}.nii.gz')).dataobj)) <= {0, 1, 2, 3}


def test_no_entry_of_the_input_folder_is_dropped_silently(exported, tmp_path, capsys):
  root = tmp_path / 'mixed'
  _nnunet_folder(root, case_ids=('CASE_A',))
  write_patient(str(root / 'Brats18_X_1'), (36, 36, 30), 'Brats18_X_1', seed=1)
  scan = predict.scan_input_folder(str(root))
  # nnU-Net-style files and a BraTS case folder in one folder: both are cases.
  assert [c for c, _ in scan.cases] == ['Brats18_X_1', 'CASE_A']
  assert scan.skipped == []
  out = tmp_path / 'segs'
  assert predict.main(['--checkpoint', exported, '--input-dir', str(root), '--out',
                       str(out)]) == 0
  assert {'Brats18_X_1.nii.gz', 'CASE_A.nii.gz'} <= set(os.listdir(out))
  # An empty case folder and a stray file beside good cases: listed, exit status 1.
  os.makedirs(root / 'Brats18_EMPTY_1')
  (root / 'notes.txt').write_text('scanner protocol')
  (root / 'extra.nii.gz').write_bytes((root / 'CASE_A_0000.nii.gz').read_bytes())
  scan = predict.scan_input_folder(str(root))
  assert [c for c, _ in scan.cases] == ['Brats18_X_1', 'CASE_A']
  assert dict(scan.skipped) == {
      'Brats18_EMPTY_1/': 'a folder without .nii / .nii.gz files',
      'extra.nii.gz': 'a NIfTI file that is not named as a channel file (<case id>_0000.nii.gz,'
                      ' nnU-Net style) nor inside a case folder',
      'notes.txt': 'not a NIfTI image'}
  capsys.readouterr()
  assert predict.main(['--checkpoint', exported, '--input-dir', str(root), '--out',
                       str(out), '--continue']) == 1
  err = capsys.readouterr().err
  assert 'error: Brats18_EMPTY_1/: skipped: a folder without .nii / .nii.gz files' in err
  assert 'error: notes.txt: skipped: not a NIfTI image' in err
  assert '0 case(s) failed and 3 entr(ies)' in err
  # A case id found both as flat files and as a folder is refused before any work.
  write_patient(str(root / 'CASE_A'), (36, 36, 30), 'CASE_A', seed=2)
  with pytest.raises(predict.PredictionError, match='found twice.*CASE_A'):
    predict.scan_input_folder(str(root))


def test_a_label_file_given_as_a_scan_is_refused(exported, tmp_path, capsys):
  paths = write_patient(str(tmp_path / 'in'), (32, 32, 32), keys=('flair', 't1'))
  seg = np.zeros((32, 32, 32), np.uint8)
  seg[10:20, 10:20, 10:20] = 2
  seg[12:16, 12:16, 12:16] = 4
  seg[14, 14, 14] = 1
  img = nib.load(paths['flair'])
  seg_path = str(tmp_path / 'in' / 'P1_seg.nii.gz')
  nib.save(nib.Nifti1Image(seg, img.affine, img.header), seg_path)
  rc, err = run_cli(capsys, '--checkpoint', exported, '--flair', seg_path, '--t1', paths['t1'],
                    '--out', str(tmp_path / 'seg.nii.gz'))
  assert rc == 2
  assert 'P1_seg.nii.gz: looks like a label map or mask, not an MRI scan' in err
  assert 'values 0, 1, 2, 4' in err
  # A float volume with the same few values is refused as well.
  nib.save(nib.Nifti1Image(seg.astype(np.float32), img.affine), seg_path)
  rc, err = run_cli(capsys, '--checkpoint', exported, '--flair', seg_path, '--out',
                    str(tmp_path / 'seg.nii.gz'))
  assert rc == 2 and 'looks like a label map' in err


def test_test_time_mirroring_maps_each_mirroring_back(model, monkeypatch):
  """With a stand-in network that is itself mirror-equivariant (per-voxel sigmoids of the
  input), the mirrored-and-back average equals one plain pass and nobody disagrees; any
  mistake in flipping back would break the equality (the input is not symmetric)."""
  rs = np.random.RandomState(0)
  image = rs.rand(20, 18, 16, 4).astype(np.float32)

  def per_voxel(variables, images, overlap=None, blend=None):
    del variables, overlap, blend
    return 1.0 / (1.0 + np.exp(-(np.asarray(images) - 0.5) * 8))

  monkeypatch.setattr(model.inference, 'predict', per_voxel)
  plain, none = inference.box_probabilities(model, image)
  mean, disagreement = inference.box_probabilities(model, image, tta=True)
  assert none is None
  np.testing.assert_allclose(mean, plain, rtol=1e-6)
  assert disagreement.shape == image.shape[:3] and not disagreement.any()

  calls = []

  def one_sided(variables, images, overlap=None, blend=None):
    del variables, overlap, blend
    images = np.asarray(images)
    calls.append(len(images))
    out = np.zeros(images.shape, np.float32)
    out[:, :10] = 1.0          # "tumour" in the first half of x, wherever the input is
    return out

  monkeypatch.setattr(model.inference, 'predict', one_sided)
  mean, disagreement = inference.box_probabilities(model, image, tta=True)
  assert calls == [8]
  # Half the mirrorings flip x: each x half is on in 4 of 8 predictions.
  np.testing.assert_allclose(mean[..., 0], 0.5)
  np.testing.assert_allclose(disagreement, 0.5)


def test_single_case_sidecar_tta_and_uncertainty(exported, tmp_path, capsys):
  paths = write_patient(str(tmp_path / 'in'), (36, 34, 32), seed=4)
  out = str(tmp_path / 'seg.nii.gz')
  assert predict.main(['--checkpoint', exported, '--flair', paths['flair'], '--t2',
                       paths['t2'], '--out', out, '--tta']) == 0
  printed = capsys.readouterr().out
  assert 'tumour volumes: WT' in printed and 'expected accuracy with FLAIR+T2' in printed
  assert_same_geometry(str(tmp_path / 'seg_uncertainty.nii.gz'), paths['flair'])
  uncertainty = np.asarray(nib.load(str(tmp_path / 'seg_uncertainty.nii.gz')).dataobj)
  assert uncertainty.min() >= 0 and uncertainty.max() <= 1
  with open(tmp_path / 'seg.json') as f:
    record = json.load(f)
  assert record['test_time_mirroring'] is True
  assert record['inputs']['FLAIR'] == os.path.abspath(paths['flair'])
  assert record['inputs']['T1'] is None
  assert record['outputs'][0] == os.path.abspath(out)


def _nnunet_folder(root, case_ids=('CASE_A', 'CASE_B'), channels=(0, 1, 2, 3)):
  """nnU-Net-style flat files CASE_000k.nii.gz made from brats2021 patients."""
  os.makedirs(root, exist_ok=True)
  for seed, case_id in enumerate(case_ids):
    paths = write_patient(str(root / f'src{seed}'), (36, 36, 30), case_id, seed=seed)
    for k, key in enumerate(KEYS_2021):
      if k in channels:
        os.replace(paths[key], str(root / f'{case_id}_{k:04d}.nii.gz'))
    shutil.rmtree(str(root / f'src{seed}'))


def test_nnunet_style_inputs_channel_order_and_dataset_json(tmp_path):
  root = tmp_path / 'imagesTs'
  _nnunet_folder(root, channels=(0, 3))
  cases = predict.folder_cases(str(root))
  assert [c for c, _ in cases] == ['CASE_A', 'CASE_B']
  assert sorted(cases[0][1]) == ['t2f', 't2w']                     # FLAIR, T2 by default
  cases = predict.folder_cases(str(root), channels='T2,T1,T1Gd,FLAIR')
  assert cases[0][1]['t2w'].endswith('CASE_A_0000.nii.gz')
  # An nnU-Net v2 dataset.json beside the folder (in its parent) gives the order.
  (tmp_path / 'dataset.json').write_text(json.dumps(
      {'channel_names': {'0': 'T1ce', '1': 'Flair', '2': 'T1', '3': 'T2'}}))
  cases = predict.folder_cases(str(root))
  assert cases[0][1]['t1c'].endswith('CASE_A_0000.nii.gz')
  assert cases[0][1]['t2w'].endswith('CASE_A_0003.nii.gz')
  (tmp_path / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'PD'}}))
  with pytest.raises(predict.PredictionError, match=r"dataset.json: channel 0: unknown .*'PD'"):
    predict.folder_cases(str(root))
  with pytest.raises(predict.PredictionError, match='named by two channels'):
    predict.folder_cases(str(root), channels='FLAIR,flair')


def test_nnunet_folder_mode_and_continue(exported, tmp_path, capsys):
  root = tmp_path / 'imagesTs'
  _nnunet_folder(root)
  out = tmp_path / 'segs'
  args = ['--checkpoint', exported, '--input-dir', str(root), '--out', str(out)]
  assert predict.main(args) == 0
  assert sorted(os.listdir(out)) == ['CASE_A.json', 'CASE_A.nii.gz', 'CASE_B.json',
                                     'CASE_B.nii.gz', 'volumes.csv']
  os.remove(str(out / 'CASE_B.nii.gz'))
  before = os.stat(str(out / 'CASE_A.nii.gz')).st_mtime_ns
  capsys.readouterr()
  assert predict.main(args + ['--continue']) == 0
  captured = capsys.readouterr()
  assert '1 case(s) already segmented' in captured.err
  # Not a terminal (as in a SLURM log): one line per case with its time.
  assert re.search(r'^CASE_B: [0-9.]+ s, FLAIR\+T1\+T1Gd\+T2, WT / TC / ET [0-9./ ]+ mL -> '
                   r'.*CASE_B.nii.gz$', captured.err, re.M)
  assert 'CASE_A:' not in captured.err
  assert '1 already done (--continue)' in captured.out
  # The folder's volumes.csv still lists both cases (CASE_A's from its sidecar).
  with open(out / 'volumes.csv') as f:
    assert [r['case_id'] for r in csv.DictReader(f)] == ['CASE_A', 'CASE_B']
  assert os.stat(str(out / 'CASE_A.nii.gz')).st_mtime_ns == before
  assert (out / 'CASE_B.nii.gz').exists()


def run_cli(capsys, *argv):
  rc = predict.main(list(argv))
  return rc, capsys.readouterr().err


def test_errors(exported, tmp_path, capsys):
  base = str(tmp_path / 'in')
  paths = write_patient(base, (32, 32, 32))
  out = str(tmp_path / 'seg.nii.gz')
  rc, err = run_cli(capsys, '--checkpoint', exported, '--out', out)
  assert rc == 2 and 'no modality given' in err

  rc, err = run_cli(capsys, '--checkpoint', exported, '--t2f', str(tmp_path / 'none.nii.gz'),
                    '--out', out)
  assert rc == 2 and 'not found' in err

  odd = write_patient(str(tmp_path / 'shapes'), (32, 32, 32), keys=('flair', 't1'),
                      shapes={'t1': (32, 30, 32)})
  rc, err = run_cli(capsys, '--checkpoint', exported, '--flair', odd['flair'], '--t1',
                    odd['t1'], '--out', out)
  assert rc == 2 and 'shape (32, 30, 32) differs' in err

  shifted = oblique_affine()
  shifted[:3, 3] += 5.0
  moved = write_patient(str(tmp_path / 'affines'), (32, 32, 32), keys=('flair', 't2'),
                        affine={'flair': oblique_affine(), 't2': shifted})
  rc, err = run_cli(capsys, '--checkpoint', exported, '--flair', moved['flair'], '--t2',
                    moved['t2'], '--out', out)
  assert rc == 2 and 'affine differs' in err

  # --config names a config the checkpoint was not trained with.
  demo = os.path.join(helpers_eval.ROOT, 'configs', 'demo.py')
  rc, err = run_cli(capsys, '--checkpoint', exported, '--flair', paths['flair'], '--out', out,
                    '--config', demo)
  assert rc == 2 and 'trained with another config' in err and 'model.init_channels' in err

  # A checkpoint whose weights do not fit its own config.json.
  broken = str(tmp_path / 'broken')
  shutil.copytree(exported, broken)
  with open(os.path.join(broken, 'config.json')) as f:
    config = json.load(f)
  config['model']['init_channels'] = 8
  with open(os.path.join(broken, 'config.json'), 'w') as f:
    json.dump(config, f)
  rc, err = run_cli(capsys, '--checkpoint', broken, '--flair', paths['flair'], '--out', out)
  assert rc == 2 and 'another config' in err

  rc, err = run_cli(capsys, '--checkpoint', str(tmp_path / 'nowhere'), '--flair',
                    paths['flair'], '--out', out)
  assert rc == 2 and 'is not a folder' in err
  assert not os.path.exists(out)


def test_figure(tmp_path_factory, exported, tmp_path):
  run = helpers_eval.trained_run(tmp_path_factory)
  case = sorted(d for d in os.listdir(os.path.join(run.workdir, 'synthetic'))
                if os.path.isdir(os.path.join(run.workdir, 'synthetic', d)))[0]
  out = str(tmp_path / 'fig.png')
  assert visualize.main(['--checkpoint', exported, '--case',
                         os.path.join(run.workdir, 'synthetic', case), '--out', out]) == 0
  assert os.path.getsize(out) > 10_000
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_figure_panels_follow_the_modalities_present():
  T, F = True, False
  assert visualize.figure_subsets((T, T, T, T)) == visualize.FIGURE_SUBSETS
  # FLAIR and T1Gd only: no panel claims T1 or T2, none is repeated.
  assert visualize.figure_subsets((T, F, T, F)) == ((T, F, T, F), (T, F, F, F), (F, F, T, F))
  assert visualize.figure_subsets((F, T, F, F)) == ((F, T, F, F),)
  assert visualize._panel_label((T, F, T, F), (T, F, T, F)) == 'FLAIR+T1Gd (all present)'
  assert visualize._panel_label((T, T, T, T), (T, T, T, T)) == 'All four'


def test_figure_title_slice_is_an_index_of_the_input_volume():
  """Model grid: 2 mm voxels from the input's origin, the box starting at voxel 5 of the
  third axis; its slice 3 is resampled voxel 8, 16 mm, the input's (1 mm) slice 16."""
  meta = {'box_start': [0, 0, 5], 'box_size': [10, 10, 10],
          'resampled_affine': np.diag([2.0, 2.0, 2.0, 1.0]).tolist(),
          'original_affine': np.eye(4).tolist()}
  assert visualize.original_slice(meta, 3) == 16


def test_figure_with_missing_modalities(exported, tmp_path, monkeypatch):
  paths = write_patient(str(tmp_path / 'Brats18_M_1'), (36, 36, 30), 'Brats18_M_1',
                        keys=('flair', 't1ce'))
  assert len(paths) == 2
  titles = []
  original = visualize.plt.Figure.suptitle

  def keep(fig, text, **kwargs):
    titles.append(text)
    return original(fig, text, **kwargs)

  monkeypatch.setattr(visualize.plt.Figure, 'suptitle', keep)
  out = str(tmp_path / 'fig.png')
  assert visualize.main(['--checkpoint', exported, '--case', str(tmp_path / 'Brats18_M_1'),
                         '--out', out]) == 0
  assert os.path.getsize(out) > 10_000
  assert len(titles) == 1
  title = titles[0]
  assert title.startswith('Brats18_M_1, export (export of ') and ', step 2)' in title
  assert 'of the input volume' in title
  assert 'T1, T2 absent: only subsets of FLAIR+T1Gd were run' in title


def _regrid(path, out, zooms):
  """``path`` resampled (trilinear) onto a grid of voxel size ``zooms`` covering the same
  field of view: what a scanner's other series of the same session looks like."""
  import nibabel.processing
  img = nib.load(path)
  moved = nibabel.processing.resample_to_output(
      nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine), voxel_sizes=zooms,
      order=1)
  nib.save(moved, out)
  return out


def test_resample_to_puts_other_grids_onto_the_reference(exported, tmp_path, capsys):
  paths = write_patient(str(tmp_path / 'in'), (40, 36, 30), seed=5, affine=np.diag(
      [1.0, 1.0, 1.0, 1.0]))
  thick = _regrid(paths['flair'], str(tmp_path / 'flair_thick.nii.gz'), (1.0, 1.0, 3.0))
  out = str(tmp_path / 'seg.nii.gz')
  rc, err = run_cli(capsys, '--checkpoint', exported, '--flair', thick, '--t1ce', paths['t1ce'],
                    '--out', out)
  assert rc == 2 and 'differs' in err and '--resample_to' in err
  assert predict.main(['--checkpoint', exported, '--flair', thick, '--t1ce', paths['t1ce'],
                       '--out', out, '--resample_to', 'T1Gd']) == 0
  assert_same_geometry(out, paths['t1ce'])
  with open(tmp_path / 'seg.json') as f:
    record = json.load(f)
  assert record['resampled_to_grid_of'] == 'T1Gd'
  assert record['field_of_view_coverage']['FLAIR'] > 0.9
  assert record['inputs']['FLAIR'] == os.path.abspath(thick)
  # Volumes that are not in one frame (no overlap in world space) are refused.
  far = nib.load(thick)
  moved = far.affine.copy()
  moved[:3, 3] += 500.0
  nib.save(nib.Nifti1Image(np.asarray(far.dataobj), moved), str(tmp_path / 'far.nii.gz'))
  rc, err = run_cli(capsys, '--checkpoint', exported, '--flair', str(tmp_path / 'far.nii.gz'),
                    '--t1ce', paths['t1ce'], '--out', out, '--resample_to', 't1ce')
  assert rc == 2 and 'do not overlap in world space' in err and 'not co-registered' in err
  rc, err = run_cli(capsys, '--checkpoint', exported, '--flair', thick, '--out', out,
                    '--resample_to', 'T2')
  assert rc == 2 and 'not among the inputs' in err


REAL = os.environ.get('MSTKD_BRATS2018', os.path.join(os.path.dirname(helpers_eval.ROOT),
                                                      'shared', 'data', 'brats2018'))


@pytest.mark.skipif(not os.path.isdir(REAL), reason='BraTS 2018 sample cases not available')
def test_resample_to_on_a_real_case(model, tmp_path):
  """A real case whose FLAIR is re-gridded to 5 mm slices: predicted onto the T1Gd grid, the
  output has the T1Gd geometry and the resampled FLAIR keeps the scan's intensities."""
  case = sorted(os.listdir(REAL))[0]
  folder = os.path.join(REAL, case)
  flair = os.path.join(folder, f'{case}_flair.nii.gz')
  t1ce = os.path.join(folder, f'{case}_t1ce.nii.gz')
  thick = _regrid(flair, str(tmp_path / 'flair_5mm.nii.gz'), (1.0, 1.0, 5.0))
  assert nib.load(thick).shape[2] < nib.load(flair).shape[2] / 4
  regridded, coverage = regrid.onto_grid_of({'flair': thick, 't1ce': t1ce}, 'T1Gd',
                                                    str(tmp_path))
  assert coverage['FLAIR'] > 0.95
  back = np.asarray(nib.load(regridded['flair']).dataobj)
  original = np.asarray(nib.load(flair).dataobj, np.float32)
  assert back.shape == original.shape
  brain = original > 0
  # Through 5 mm and back: the same scan, smoothed along z.
  assert np.corrcoef(back[brain], original[brain])[0, 1] > 0.9


def test_case_report(exported, tmp_path):
  paths = write_patient(str(tmp_path / 'in'), (40, 36, 30), seed=6, keys=('flair', 't1ce'))
  out = str(tmp_path / 'P1.nii.gz')
  assert predict.main(['--checkpoint', exported, '--flair', paths['flair'], '--t1ce',
                       paths['t1ce'], '--out', out, '--report']) == 0
  png = tmp_path / 'P1_report.png'
  assert png.stat().st_size > 20_000
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(tmp_path / 'P1.json') as f:
    record = json.load(f)
  assert str(png) in record['outputs'] and record['case_id'] == 'P1'
  assert predict.case_id_from_files(['/a/BraTS-GLI-00001-000-t2f.nii.gz']) == \
      'BraTS-GLI-00001-000'
  assert predict.case_id_from_files(['/a/scan.nii']) == 'scan'
  record = {'case_id': 'P1', 'modalities_used': 'FLAIR+T1Gd', 'modalities_missing': ['T1', 'T2'],
            'volumes_ml': {'WT': 12.5, 'TC': 3.25, 'ET': 1.0, 'NCR': 2.25, 'ED': 9.25,
                           'ET ': 1.0},
            'expected_accuracy': {'dice': {'WT': 0.8, 'TC': 0.6, 'ET': 0.5}, 'num_cases': 4,
                                  'split': 'test', 'evaluated': 'step 6000'},
            'labels': {'convention': 'brats2021', 'values': {'NCR': 1, 'ED': 2, 'ET': 4}},
            'model': {'checkpoint': '/m/export', 'source': 'export /m/export'}}
  text = visualize._report_text(record, 'P1_t1ce.nii.gz')
  assert 'Missing:         T1, T2' in text and 'WT    12.50' in text
  assert 'WT 80.0  TC 60.0  ET 50.0 %' in text and '4 test case(s)' in text
  record['expected_accuracy'] = None
  assert 'not known: no evaluation recorded' in visualize._report_text(record, 'x')
