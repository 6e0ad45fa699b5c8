"""Prediction under faults and misuse: nothing silently wrong, every failure one line.

A modality given twice or one file given as two modalities, ``--continue`` into a folder of
another label convention or over a case without its sidecar, a stray NIfTI file in a case
folder, an expected accuracy measured on synthetic cases, an output folder that cannot be
written, a full disk; and the outputs a study relies on (the TTA uncertainty's values, the case
report's orientation, slices, legend and resolution).
"""

import errno
import json
import os
import shutil
import subprocess

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from mstkd_jax import inference
from mstkd_jax import model_facts
from mstkd_jax import predict
from mstkd_jax import visualize
from mstkd_jax.data import layouts
from mstkd_jax.predict import outputs
from tests.test_predict import write_patient


def _two_cases(root):
  write_patient(str(root / 'Brats18_A_1'), (36, 36, 30), 'Brats18_A_1', seed=1)
  write_patient(str(root / 'Brats18_B_1'), (36, 36, 30), 'Brats18_B_1', seed=2)


def test_a_modality_given_twice_is_refused(exported, tmp_path, capsys):
  paths = write_patient(str(tmp_path / 'in'), (36, 36, 30), seed=3)
  out = str(tmp_path / 'seg.nii.gz')
  for args in (['--flair', paths['flair'], '--t2f', paths['t2']],
               ['--flair', paths['flair'], '--flair=' + paths['t2']]):
    assert predict.main(['--checkpoint', exported, '--out', out] + args) == 2
    err = capsys.readouterr().err
    assert 'FLAIR is given twice' in err and paths['flair'] in err and paths['t2'] in err
  assert not os.path.exists(out)


def test_one_file_given_as_two_modalities_is_refused(exported, tmp_path, capsys):
  paths = write_patient(str(tmp_path / 'in'), (36, 36, 30), seed=3)
  out = str(tmp_path / 'seg.nii.gz')
  assert predict.main(['--checkpoint', exported, '--flair', paths['flair'], '--t1',
                       paths['flair'], '--out', out]) == 2
  assert 'is given as FLAIR and T1' in capsys.readouterr().err
  assert not os.path.exists(out)


def test_continue_refuses_to_mix_label_conventions(exported, tmp_path, capsys):
  root, out = tmp_path / 'cases', tmp_path / 'segs'
  _two_cases(root)
  args = ['--checkpoint', exported, '--input_dir', str(root), '--out', str(out)]
  assert predict.main(args + ['--labels', 'brats2021']) == 0
  os.remove(out / 'Brats18_B_1.nii.gz')
  before = sorted(os.listdir(out))
  capsys.readouterr()
  assert predict.main(args + ['--continue', '--labels', 'brats2024']) == 2
  err = capsys.readouterr().err
  assert 'already holds brats2021 segmentations' in err and '--labels brats2021' in err
  assert sorted(os.listdir(out)) == before
  # The folder's own convention carries on.
  assert predict.main(args + ['--continue', '--labels', 'brats2021']) == 0


def test_continue_redoes_a_case_without_its_sidecar(exported, tmp_path, capsys):
  root, out = tmp_path / 'cases', tmp_path / 'segs'
  _two_cases(root)
  args = ['--checkpoint', exported, '--input_dir', str(root), '--out', str(out)]
  assert predict.main(args) == 0
  os.remove(out / 'Brats18_B_1.json')
  assert sorted(outputs.finished_cases(str(out))) == ['Brats18_A_1']
  capsys.readouterr()
  assert predict.main(args + ['--continue']) == 0
  assert '1 already done (--continue)' in capsys.readouterr().out
  assert os.path.exists(out / 'Brats18_B_1.json')
  with open(out / 'volumes.csv') as f:
    assert [line.split(',')[0] for line in f.read().split()[1:]] == ['Brats18_A_1',
                                                                     'Brats18_B_1']


def test_a_stray_nifti_in_a_case_folder_is_listed(exported, tmp_path, capsys):
  root = tmp_path / 'cases'
  paths = write_patient(str(root / 'Brats18_A_1'), (36, 36, 30), 'Brats18_A_1', seed=1)
  shutil.copy(paths['flair'], root / 'Brats18_A_1' / 'Brats18_A_1_flair_copy.nii.gz')
  scan = predict.scan_input_folder(str(root))
  assert [c for c, _ in scan.cases] == ['Brats18_A_1']
  entry, reason = scan.skipped[0]
  assert entry == os.path.join('Brats18_A_1', 'Brats18_A_1_flair_copy.nii.gz')
  assert 'none of its scans' in reason and 'not read' in reason
  assert predict.main(['--checkpoint', exported, '--input_dir', str(root), '--out',
                       str(tmp_path / 'segs')]) == 1
  assert 'Brats18_A_1_flair_copy.nii.gz: skipped' in capsys.readouterr().err


def test_expected_accuracy_says_what_it_was_measured_on(exported, tmp_path, capsys):
  with open(os.path.join(exported, model_facts.EVALUATION_FILE)) as f:
    assert json.load(f)['data'] == {'root': None, 'synthetic': True}
  paths = write_patient(str(tmp_path / 'in'), (36, 36, 30), seed=3)
  out = str(tmp_path / 'seg.nii.gz')
  assert predict.main(['--checkpoint', exported, '--flair', paths['flair'], '--out', out]) == 0
  captured = capsys.readouterr()
  assert 'synthetic cases' in captured.out
  assert 'warning: the expected accuracy was measured on' in captured.err
  with open(tmp_path / 'seg.json') as f:
    expected = json.load(f)['expected_accuracy']
  assert expected['data'] == 'synthetic cases' and 'synthetic' in expected['caveat']
  real = {'data': {'root': '/data/brats', 'synthetic': False}}
  assert 'only 4 case(s)' in model_facts.evaluation_caveat(real, 4)
  assert model_facts.evaluation_caveat(real, 12) is None


def test_an_unwritable_output_is_refused_before_any_work(exported, tmp_path, capsys,
                                                         monkeypatch):
  paths = write_patient(str(tmp_path / 'in'), (36, 36, 30), seed=3)

  def refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, 'Permission denied')

  def no_model(*args, **kwargs):
    raise AssertionError('the network was loaded before the output was checked')

  monkeypatch.setattr(outputs.tempfile, 'mkstemp', refuse)
  monkeypatch.setattr(predict.command, 'load_model', no_model)
  for out in (str(tmp_path / 'ro' / 'seg.nii.gz'), str(tmp_path / 'ro_folder')):
    flags = (['--input_dir', str(tmp_path / 'in')] if out.endswith('folder')
             else ['--flair', paths['flair']])
    assert predict.main(['--checkpoint', exported, '--out', out] + flags) == 2
    assert 'cannot write into' in capsys.readouterr().err


def test_a_failed_write_leaves_no_temporary_file(exported, tmp_path, capsys, monkeypatch):
  paths = write_patient(str(tmp_path / 'in'), (36, 36, 30), seed=3)
  real_save = nib.save

  def full_disk(img, filename):
    with open(filename, 'wb') as f:      # a partial file, as a full disk leaves it
      f.write(b'\0' * 10)
    raise OSError(errno.ENOSPC, 'No space left on device', filename)

  monkeypatch.setattr(nib, 'save', full_disk)
  out = tmp_path / 'segs' / 'seg.nii.gz'
  assert predict.main(['--checkpoint', exported, '--flair', paths['flair'], '--out',
                       str(out)]) == 4
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f'error: cannot write {out}: No space left on device; ')
  assert 'MB free in' in err
  assert os.listdir(out.parent) == []
  monkeypatch.setattr(nib, 'save', real_save)


def _small_filesystem(path, size='300k'):
  """A tmpfs of ``size`` mounted at ``path`` (root only), or skips the test."""
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, text=True, check=False)
  if result.returncode != 0:
    pytest.skip(f'cannot mount a small tmpfs here: {result.stderr.strip() or "not root"}')


@pytest.mark.slow
def test_full_disk_in_folder_mode_one_line_and_continue(exported, tmp_path, capsys):
  root, out = tmp_path / 'cases', tmp_path / 'small'
  _two_cases(root)
  _small_filesystem(out)
  try:
    filler = out / 'filler'
    handle = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
      while os.write(handle, b'\0' * 4096):
        pass
    except OSError:
      pass                       # the disk is full
    finally:
      os.close(handle)
    args = ['--checkpoint', exported, '--input_dir', str(root), '--out', str(out)]
    assert predict.main(args) == 4
    err = capsys.readouterr().err
    assert 'No space left on device' in err and '--continue' in err
    assert not [n for n in os.listdir(out) if n.startswith('.tmp') or n.endswith('.tmp')]
    os.remove(filler)
    assert predict.main(args + ['--continue']) == 0
    assert sorted(outputs.finished_cases(str(out))) == ['Brats18_A_1', 'Brats18_B_1']
  finally:
    subprocess.run(['umount', str(out)], check=False)


def test_tta_uncertainty_is_a_share_of_the_8_mirrorings(exported, tmp_path):
  paths = write_patient(str(tmp_path / 'in'), (36, 34, 32), seed=4)
  out = str(tmp_path / 'seg.nii.gz')
  assert predict.main(['--checkpoint', exported, '--flair', paths['flair'], '--out', out,
                       '--tta']) == 0
  shares = np.asarray(nib.load(str(tmp_path / 'seg_uncertainty.nii.gz')).dataobj) * 8
  np.testing.assert_allclose(shares, np.round(shares), atol=1e-5)


def test_report_views_put_the_patient_sides_where_the_letters_say():
  volume = np.zeros((20, 22, 24), np.uint8)
  volume[15:, :, :] = 1          # the patient's right (RAS+: +x is right)
  volume[:, 16:, :] |= 2         # anterior
  volume[:, :, 18:] |= 4         # superior
  views = visualize.report_views(volume, (10, 11, 12))
  for name, view in views.items():
    left, right, top, bottom = visualize.VIEW_SIDES[name]
    bit = {'R': 1, 'L': 1, 'A': 2, 'P': 2, 'S': 4, 'I': 4}
    columns, rows = view.shape[1], view.shape[0]
    # The side a letter names holds the marked half, the opposite side does not.
    assert (view[:, -1] & bit[right]).all() == (right in 'RAS')
    assert (view[:, 0] & bit[left]).all() == (left in 'RAS')
    assert (view[0, :] & bit[top]).all() == (top in 'RAS')
    assert (view[-1, :] & bit[bottom]).all() == (bottom in 'RAS')
    assert columns > 0 and rows > 0


def test_report_slices_go_through_the_core():
  codes = np.zeros((30, 30, 30), np.uint8)
  codes[2:28, 2:28, 2:28] = layouts.EDEMA            # a large oedema, centred at 14.5
  codes[3:7, 20:24, 5:9] = layouts.CORE              # a small core far from its centre
  centre = visualize.tumour_centre(layouts.region_masks(codes))
  assert codes[centre] == layouts.CORE


def test_case_report_resolution_and_legend_names(exported, tmp_path, monkeypatch):
  legends = []
  real_legend = visualize.plt.Axes.legend

  def record_legend(self, *args, **kwargs):
    legends.append([h.get_label() for h in kwargs.get('handles', [])])
    return real_legend(self, *args, **kwargs)

  monkeypatch.setattr(visualize.plt.Axes, 'legend', record_legend)
  paths = write_patient(str(tmp_path / 'in'), (40, 36, 30), seed=6, keys=('flair', 't1ce'))
  out = str(tmp_path / 'P1.nii.gz')
  assert predict.main(['--checkpoint', exported, '--flair', paths['flair'], '--t1ce',
                       paths['t1ce'], '--out', out, '--report', '--labels', 'brats2024']) == 0
  height, width = matplotlib.image.imread(str(tmp_path / 'P1_report.png')).shape[:2]
  assert width >= 150 * 15 and height >= 150 * 5
  names = ' '.join(legends[-1])
  assert 'NETC' in names and 'SNFH' in names and 'NCR' not in names


def test_inference_module_is_what_prediction_loads(exported):
  model = predict.load_model(exported)
  assert isinstance(model, inference.Model) and model.facts.evaluation


def test_two_predictions_into_one_folder_the_second_stops(exported, tmp_path, capsys):
  from mstkd_jax import workdir_lock
  root, out = tmp_path / 'cases', tmp_path / 'segs'
  _two_cases(root)
  with workdir_lock.hold(str(out), 'prediction'):
    assert predict.main(['--checkpoint', exported, '--input_dir', str(root), '--out',
                         str(out)]) == 2
    err = capsys.readouterr().err
    assert 'in use by another job' in err and 'prediction' in err
    assert not [n for n in os.listdir(out) if n.endswith('.nii.gz')]
  assert predict.main(['--checkpoint', exported, '--input_dir', str(root), '--out',
                       str(out)]) == 0
  assert not os.path.exists(os.path.join(out, workdir_lock.LOCK_NAME))
