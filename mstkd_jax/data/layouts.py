"""Case folder layouts of BraTS / FeTS, case discovery and label conventions.

Two layouts are known (docs/data.md, "Case folders"):

* ``brats2024`` (BraTS 2023/2024 GLI):
  ``BraTS-GLI-00005-100/BraTS-GLI-00005-100-{t2f,t1n,t1c,t2w,seg}.nii.gz``,
  labels 1 NETC, 2 SNFH, 3 ET, 4 RC (resection cavity).
* ``brats2021`` (BraTS 2018-2021, FeTS): ``<ID>/<ID>_{flair,t1,t1ce,t2,seg}.nii[.gz]``,
  labels 1 NCR, 2 ED, 4 ET.

Both are mapped to one *canonical* label code, stored in the cache as uint8:
0 background, 1 NETC/NCR, 2 SNFH/ED, 3 ET, 4 RC. The four network output channels are
ch0 = code 1, ch1 = code 2, ch2 = code 3, ch3 = background = everything else (so RC is
background); WT = ch0|ch1|ch2, TC = ch0|ch2, ET = ch2.

Discovery walks ``root`` recursively: every folder that directly holds ``.nii``/``.nii.gz``
files is a case, named after the folder (BraTS 2018's ``HGG/``/``LGG/`` sub-folders work).
A file belongs to modality ``key`` of a layout when its name without extension ends with
``<sep><key>`` (``-t1c``, ``_t1ce``; case-insensitive). Nothing here reads voxels.
"""

import dataclasses
import os
from typing import Optional

import numpy as np

from mstkd_jax.cli import InputError
from mstkd_jax.modalities import LEGACY_KEYS, MODALITY_KEYS

NIFTI_SUFFIXES = ('.nii.gz', '.nii')

# Canonical label codes (cache) and what they mean.
BACKGROUND, CORE, EDEMA, ENHANCING, CAVITY = 0, 1, 2, 3, 4
# Output channel of each canonical code (code 0 and 4 -> background channel 3).
CODE_TO_CHANNEL = np.array([3, 0, 1, 2, 3], np.int64)
# One-hot rows for the four output channels, indexed by canonical code.
CODE_TO_ONEHOT = np.eye(4, dtype=np.float32)[CODE_TO_CHANNEL]
# The one-hot labels of training batches: 0/1 in uint8 (exact, a quarter of float32's bytes to
# build, pass between processes and copy to the accelerator; the training step computes in
# float32).
TRAIN_LABEL_DTYPE = np.uint8
REGIONS = ('WT', 'TC', 'ET')
REGION_CODES = {'WT': (CORE, EDEMA, ENHANCING), 'TC': (CORE, ENHANCING), 'ET': (ENHANCING,)}


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  sep: str                    # separator between case id and modality key in file names
  image_keys: tuple           # file keys in channel order FLAIR, T1, T1Gd, T2
  seg_key: str
  label_to_code: dict         # raw label value -> canonical code (0 maps to 0)

  @property
  def keys(self):
    return self.image_keys + (self.seg_key,)

  @property
  def allowed_labels(self):
    return tuple(sorted({0, *self.label_to_code}))

  def modality_of(self, key):
    """'t1ce' -> 't1c' (the BraTS 2024 name of the channel)."""
    return MODALITY_KEYS[self.image_keys.index(key)]


LAYOUTS = {
    'brats2024': Layout('brats2024', '-', MODALITY_KEYS, 'seg',
                        {1: CORE, 2: EDEMA, 3: ENHANCING, 4: CAVITY}),
    'brats2021': Layout('brats2021', '_', LEGACY_KEYS, 'seg',
                        {1: CORE, 2: EDEMA, 4: ENHANCING}),
}
# Other names accepted for a layout in the config.
LAYOUT_ALIASES = {'brats2023': 'brats2024', 'gli': 'brats2024', 'fets': 'brats2021',
                  'fets2022': 'brats2021', 'fets2024': 'brats2021', 'brats2018': 'brats2021',
                  'brats2019': 'brats2021', 'brats2020': 'brats2021'}


def get_layout(name):
  name = LAYOUT_ALIASES.get(name.lower(), name.lower())
  if name not in LAYOUTS:
    raise ValueError(f'unknown data layout {name!r}; known: auto, {", ".join(LAYOUTS)} '
                     f'(aliases: {", ".join(sorted(LAYOUT_ALIASES))})')
  return LAYOUTS[name]


class DataError(InputError, ValueError):
  """A problem with the data as a whole (root folder, split file)."""


@dataclasses.dataclass(frozen=True)
class Problem:
  case: str
  file: str        # file name (or '-' when the problem is not about one file)
  message: str

  def __str__(self):
    return f'{self.case}: {self.file}: {self.message}'


class BadCaseError(InputError, ValueError):
  """A case that cannot be used; carries every problem found (case, file, message)."""

  def __init__(self, problems, hint=''):
    self.problems = list(problems)
    super().__init__('; '.join(str(p) for p in self.problems) + (f' ({hint})' if hint else ''))

  @property
  def case(self):
    return self.problems[0].case


@dataclasses.dataclass(frozen=True)
class Case:
  """One case folder: its id, layout and the files found (None where missing)."""
  case_id: str
  folder: str
  layout: str
  images: tuple               # 4 paths (or None) in channel order FLAIR, T1, T1Gd, T2
  seg: Optional[str]
  problems: tuple = ()        # discovery problems (missing file, two candidates, ...)

  @property
  def files(self):
    return tuple(p for p in self.images + (self.seg,) if p is not None)


def strip_nifti_suffix(name):
  for suffix in NIFTI_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return None


def _candidates(names, layout):
  """{key: [file names]} of the files of `names` that match each key of `layout`."""
  found = {key: [] for key in layout.keys}
  for name in names:
    stem = strip_nifti_suffix(name)
    if stem is None:
      continue
    for key in layout.keys:
      if stem.lower().endswith(layout.sep + key):
        found[key].append(name)
  return found


def _score(found):
  return sum(1 for names in found.values() if names)


def _layout_for_folder(names, layout):
  if layout != 'auto':
    return get_layout(layout)
  scored = [(_score(_candidates(names, lay)), lay) for lay in LAYOUTS.values()]
  best = max(s for s, _ in scored)
  # Ties (also "nothing matches") go to the first layout with the best score.
  return next(lay for s, lay in scored if s == best)


def describe_case(folder, layout='auto', case_id=None):
  """Builds a Case for one folder (files only, no voxels)."""
  case_id = case_id or os.path.basename(os.path.normpath(folder))
  names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
  lay = _layout_for_folder(names, layout)
  found = _candidates(names, lay)
  problems = []
  paths = {}
  for key in lay.keys:
    cands = found[key]
    ext = '.nii.gz'
    expected = f'{case_id}{lay.sep}{key}{ext}'
    if not cands:
      what = 'label file' if key == lay.seg_key else 'modality file'
      problems.append(Problem(case_id, expected, f'missing {what} ({key}, {lay.name} layout)'))
      paths[key] = None
    elif len(cands) > 1:
      problems.append(Problem(case_id, ', '.join(cands),
                              f'{len(cands)} candidate files for {key}; keep exactly one'))
      paths[key] = None
    else:
      paths[key] = os.path.join(folder, cands[0])
  return Case(case_id=case_id, folder=folder, layout=lay.name,
              images=tuple(paths[k] for k in lay.image_keys), seg=paths[lay.seg_key],
              problems=tuple(problems))


def discover_cases(root, layout='auto'):
  """All case folders under `root`, sorted by case id.

  Raises DataError for a missing root, a root without any case folder, or two case folders
  with the same name. Per-case problems (missing files, two candidates for one modality) do not
  raise here: they are in each Case's `problems`, for the caller's on_bad_case policy.
  """
  if layout != 'auto':
    get_layout(layout)  # Fails early on a typo.
  if not root:
    raise DataError('no data root given (config.data.root)')
  if not os.path.isdir(root):
    raise DataError(f'data root {root!r} does not exist or is not a folder')
  cases = {}
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    # Hidden folders (and our own temporary ones) are not cases.
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    if not any(strip_nifti_suffix(f) is not None for f in filenames):
      continue
    case = describe_case(dirpath, layout)
    if case.case_id in cases:
      raise DataError(f'two case folders named {case.case_id!r}: '
                      f'{cases[case.case_id].folder} and {dirpath}')
    cases[case.case_id] = case
  if not cases:
    raise DataError(f'no case folders with .nii/.nii.gz files under {root!r} (expected e.g. '
                    '<root>/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz or '
                    '<root>/<ID>/<ID>_flair.nii.gz)')
  return [cases[k] for k in sorted(cases)]


MIXED = 'mixed'


def label_convention(cases):
  """The label convention a set of cases follows: 'brats2024', 'brats2021', or ``MIXED`` when
  both occur (each case is still read with its own); None for no case. Returns
  (convention, {layout name: number of cases})."""
  counts = {}
  for case in cases:
    counts[case.layout] = counts.get(case.layout, 0) + 1
  if not counts:
    return None, counts
  return (next(iter(counts)) if len(counts) == 1 else MIXED), dict(sorted(counts.items()))


def check_labels(values, layout, case_id, file_name):
  """Problems for label values outside `layout`'s convention (values: unique raw labels)."""
  lay = get_layout(layout)
  bad = [v for v in values if v not in lay.allowed_labels]
  if not bad:
    return []
  shown = ', '.join(f'{v:g}' for v in bad[:8]) + (' ...' if len(bad) > 8 else '')
  return [Problem(case_id, file_name,
                  f'label values {shown} outside the {lay.name} convention '
                  f'{list(lay.allowed_labels)}')]


def labels_to_codes(seg, layout):
  """Raw label volume -> canonical uint8 codes (values must already be checked)."""
  lay = get_layout(layout)
  lut = np.zeros(256, np.uint8)
  for raw, code in lay.label_to_code.items():
    lut[raw] = code
  seg = np.asarray(seg)
  if seg.dtype != np.uint8:
    seg = np.clip(seg, 0, 255).astype(np.uint8)   # values are checked before: 0..4
  return lut[seg]


def codes_to_onehot(codes):
  """Canonical codes [...] -> float32 [..., 4] output channels."""
  return CODE_TO_ONEHOT[np.asarray(codes)]


def codes_to_labels(codes, layout):
  """Canonical codes -> raw label values of `layout` (for writing segmentations)."""
  lay = get_layout(layout)
  lut = np.zeros(5, np.uint8)
  for raw, code in lay.label_to_code.items():
    lut[code] = raw
  return lut[np.asarray(codes)]


def region_masks(codes):
  """Canonical codes -> dict of boolean WT/TC/ET masks."""
  codes = np.asarray(codes)
  return {r: np.isin(codes, c) for r, c in REGION_CODES.items()}
