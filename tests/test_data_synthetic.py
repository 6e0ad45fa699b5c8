"""Synthetic BraTS-like cases: files, contrasts, labels; the command-line tools on them."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mstkd_jax.data import check
from mstkd_jax.data import layouts
from mstkd_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAIR, T1, T1GD, T2 = range(4)


@pytest.fixture(scope='module')
def cases():
  """(images, raw labels, tissue map) of a few brats2021 cases with every tumour part."""
  out = []
  for i in range(8):
    images, seg, tissue = synthetic.generate_case((72, 72, 56), 'brats2021', 7, i,
                                                  return_tissue=True)
    if all((seg == v).sum() > 20 for v in (1, 2, 4)):
      out.append((images, seg, tissue))
    if len(out) == 3:
      break
  assert len(out) >= 2
  return out


def test_contrasts_follow_mri(cases):
  for images, seg, tissue in cases:
    # Tissue interiors (the edges are blurred with their neighbours, as partial volume is).
    wm, gm, csf = (ndimage.binary_erosion(tissue == t)
                   for t in (synthetic.T_WM, synthetic.T_GM, synthetic.T_CSF))
    m = lambda c, mask: float(images[c][mask].mean())  # pylint: disable=cell-var-from-loop
    # T1: white matter bright, CSF dark; T2: CSF bright, white matter dark; FLAIR: CSF dark.
    assert m(T1, wm) > m(T1, gm) > 1.5 * m(T1, csf)
    assert m(T2, csf) > 1.3 * m(T2, gm) and m(T2, gm) > m(T2, wm)
    assert m(FLAIR, csf) < 0.5 * m(FLAIR, wm)
    edema, et, core = seg == 2, seg == 4, seg == 1
    # Oedema bright in FLAIR and T2, dark in T1.
    assert m(FLAIR, edema) > 1.5 * m(FLAIR, wm)
    assert m(T2, edema) > 1.5 * m(T2, wm)
    assert m(T1, edema) < 0.8 * m(T1, wm)
    # Enhancing tumour: bright in T1Gd only; like oedema elsewhere.
    assert m(T1GD, et) > 1.8 * m(T1GD, edema)
    for c in (FLAIR, T1, T2):
      ratio = m(c, et) / m(c, edema)
      assert 0.85 < ratio < 1.15, (c, ratio)
    # Necrotic core: dark in T1Gd inside its bright rim, bright in T2.
    assert m(T1GD, core) < 0.5 * m(T1GD, et)
    assert m(T2, core) > 1.5 * m(T2, wm)


def test_background_is_zero_and_brain_nonzero(cases):
  for images, seg, _ in cases:
    brain = np.any(images > 0, axis=0)
    assert not brain[0].any() and not brain[:, :, -1].any()   # skull-stripped field of view
    assert 0.15 < brain.mean() < 0.6
    assert (seg[~brain] == 0).all()


def test_cases_are_reproducible_and_distinct():
  a = synthetic.generate_case((32, 32, 24), 'brats2024', 1, 0)
  b = synthetic.generate_case((32, 32, 24), 'brats2024', 1, 0)
  c = synthetic.generate_case((32, 32, 24), 'brats2024', 1, 1)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])


def test_command_line_tools(tmp_path):
  out = tmp_path / 'synth'
  env = dict(os.environ, PYTHONPATH=REPO)
  cmd = [sys.executable, '-m', 'mstkd_jax.data.synthetic', '--out', str(out), '--cases', '2',
         '--shape', '32', '36', '28', '--layout', 'brats2024', '--seed', '4']
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
  assert res.returncode == 0, res.stderr
  cases = layouts.discover_cases(str(out))
  assert [c.case_id for c in cases] == ['BraTS-GLI-00000-000', 'BraTS-GLI-00001-000']
  img = nib.load(cases[0].images[0])
  assert img.shape == (32, 36, 28) and img.get_data_dtype() == np.int16
  seg = np.asanyarray(nib.load(cases[0].seg).dataobj)
  assert set(np.unique(seg)) <= {0, 1, 2, 3, 4}
  res = subprocess.run([sys.executable, '-m', 'mstkd_jax.data.check', '--root', str(out)],
                       capture_output=True, text=True, env=env, cwd=REPO, check=False)
  assert res.returncode == 0, res.stdout + res.stderr
  assert '2 usable, 0 with problems' in res.stdout
  os.remove(cases[1].images[2])
  assert check.main(['--root', str(out), '--quiet']) == 1
