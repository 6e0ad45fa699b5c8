"""The 20 real BraTS 2018 cases (FeTS / BraTS 2021 labels) load with the expected regions.

The folder comes from $MSTKD_BRATS2018 (default: ../shared/data/brats2018 relative to the
repository, a layout used on the maintainers' machines; see the README's "Data" section for
where to get the cases); the tests skip when it is absent. Nothing is copied into the
repository.
"""

import os

import nibabel as nib
import numpy as np
import pytest

from configs import brats
from mstkd_jax.data import layouts
from mstkd_jax.data import pipeline
from mstkd_jax.data import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.environ.get('MSTKD_BRATS2018',
                      os.path.join(os.path.dirname(REPO), 'shared', 'data', 'brats2018'))
pytestmark = pytest.mark.skipif(not os.path.isdir(ROOT), reason=f'no BraTS 2018 cases at {ROOT}')

# WT / TC / ET voxel counts, counted in the seg files with np.isin(seg, {1,2,4} / {1,4} / {4}).
EXPECTED = {
    'Brats18_2013_11_1': (139257, 65516, 19677),
    'Brats18_2013_20_1': (217380, 107445, 43379),
    'Brats18_2013_23_1': (147786, 124097, 72360),
    'Brats18_2013_3_1': (100886, 33617, 23187),
    'Brats18_CBICA_ABM_1': (39772, 9557, 6159),
    'Brats18_CBICA_ALU_1': (32051, 8280, 5973),
    'Brats18_CBICA_AME_1': (80396, 27568, 18255),
    'Brats18_CBICA_AQN_1': (26500, 17430, 9563),
    'Brats18_TCIA01_201_1': (154508, 70505, 45111),
    'Brats18_TCIA01_378_1': (125370, 56563, 43375),
    'Brats18_TCIA01_425_1': (38314, 2046, 1662),
    'Brats18_TCIA01_499_1': (55781, 36146, 26241),
    'Brats18_TCIA02_135_1': (81847, 37146, 33532),
    'Brats18_TCIA02_370_1': (107194, 55342, 30381),
    'Brats18_TCIA02_606_1': (184720, 100041, 27851),
    'Brats18_TCIA03_265_1': (60356, 39093, 17097),
    'Brats18_TCIA10_628_1': (157275, 105558, 1976),
    'Brats18_TCIA10_637_1': (231951, 92934, 1585),
    'Brats18_TCIA10_639_1': (171033, 83612, 957),
    'Brats18_TCIA13_623_1': (232098, 104710, 4674),
}


@pytest.fixture(scope='module')
def cases():
  return layouts.discover_cases(ROOT)


def test_all_cases_found_as_brats2021(cases):
  assert [c.case_id for c in cases] == sorted(EXPECTED)
  assert all(c.layout == 'brats2021' and not c.problems for c in cases)


def test_every_case_loads_with_expected_region_counts(cases):
  for case in cases:
    raw = preprocess.read_case(case)
    assert raw.image.shape == (240, 240, 155, 4) and all(raw.present)
    np.testing.assert_allclose(preprocess.voxel_sizes(raw.affine), 1.0)
    masks = layouts.region_masks(raw.codes)
    counts = tuple(int(masks[r].sum()) for r in layouts.REGIONS)
    assert counts == EXPECTED[case.case_id], case.case_id
    onehot = layouts.codes_to_onehot(raw.codes[100:140])   # a slab is enough for channels
    np.testing.assert_array_equal(onehot[..., 2], raw.codes[100:140] == layouts.ENHANCING)


def test_pipeline_on_real_cases(cases, tmp_path):
  ids = ['Brats18_CBICA_ABM_1', 'Brats18_TCIA01_425_1']
  cfg = brats.get_config()
  cfg.data.root = ROOT
  split = tmp_path / 'split.json'
  split.write_text('{"train": ["%s"], "val": [], "test": ["%s"]}' % tuple(ids))
  cfg.data.split_file = str(split)
  dataset = pipeline.prepare(cfg, str(tmp_path), progress=False)
  full = pipeline.load_eval_cases(dataset, 'test', full_box=True)[0]
  case = pipeline.load_eval_cases(dataset, 'test')[0]
  assert case.case_id == ids[1] and case.image.shape == (160, 192, 128, 4)
  assert case.spacing == (1.0, 1.0, 1.0)
  assert 0.0 <= case.image.min() and case.image.max() <= 1.0
  # The box around the brain holds every tumour voxel; back in 240x240x155 it is exact.
  seg = np.asanyarray(nib.load(os.path.join(ROOT, ids[1], f'{ids[1]}_seg.nii.gz')).dataobj)
  back = pipeline.restore_geometry(full.codes, full.meta)
  np.testing.assert_array_equal(layouts.codes_to_labels(back, 'brats2021'), seg)
  regions = layouts.region_masks(full.codes)
  assert tuple(int(regions[r].sum()) for r in layouts.REGIONS) == EXPECTED[ids[1]]
  # One training batch.
  loader = pipeline.make_train_loader(dataset, 1, seed=0, worker_count=0)
  batch = next(loader)
  assert batch['image'].shape == (1, 160, 192, 128, 4)
  assert batch['label'][..., :3].sum() > 0
  loader.close()
