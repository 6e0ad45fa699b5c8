"""Finding and checking a patient's scans: the modality files of one patient, nnU-Net channel
files (``CASE_0000.nii.gz`` .. with the channel order of ``--channels`` or a dataset.json),
BraTS case folders, every other entry of an input folder listed with the reason it is skipped,
and the preprocessing of one patient into the model's box (with ``--resample_to``, the series
re-gridded onto one modality's voxel grid first).
"""

import dataclasses
import json
import os
import re
import tempfile

from mstkd_jax import cli
from mstkd_jax import regrid
from mstkd_jax.data import layouts, pipeline
from mstkd_jax.modalities import MODALITIES, MODALITY_KEYS, channel_index
from mstkd_jax.predict.errors import PredictionError

# nnU-Net's file names: <case id>_<4-digit channel number>.nii(.gz).
CHANNEL_FILE = re.compile(r'^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$')


def check_paths(paths):
  """{modality key: path} of the given modalities, each an existing file and no file given
  as two modalities."""
  given = {k: v for k, v in paths.items() if v}
  if not given:
    raise PredictionError('no modality given: pass at least one of --t2f/--flair, --t1n/--t1, '
                          '--t1c/--t1ce, --t2w/--t2')
  missing = [str(p) for p in given.values() if not os.path.isfile(p)]
  if missing:
    raise PredictionError(f'file(s) not found: {", ".join(missing)}')
  by_file = {}
  for key, path in given.items():
    by_file.setdefault(os.path.realpath(path), []).append(key)
  for path, keys in by_file.items():
    if len(keys) > 1:
      names = ' and '.join(MODALITIES[channel_index(k)] for k in keys)
      raise PredictionError(f'{path} is given as {names}: each modality needs its own scan')
  return given


def case_id_from_files(paths):
  """The case id of a patient's files: the first file's name without its modality key
  (``Brats18_X_1`` of ``Brats18_X_1_flair.nii.gz``, ``BraTS-GLI-00001-000`` of
  ``BraTS-GLI-00001-000-t2f.nii.gz``), or the name itself."""
  stems = []
  for path in paths:
    if not path:
      continue
    stem = layouts.strip_nifti_suffix(os.path.basename(str(path))) or os.path.basename(path)
    for layout in layouts.LAYOUTS.values():
      for key in layout.image_keys:
        if stem.lower().endswith(layout.sep + key):
          stem = stem[:-len(layout.sep + key)]
          break
    stems.append(stem)
  return stems[0] if stems else 'patient'


def _case_paths(case):
  """{modality key: path} of the images a discovered case folder has."""
  blocking = [p for p in case.problems
              if not p.message.startswith(('missing modality', 'missing label'))]
  if blocking:
    raise PredictionError('; '.join(str(p) for p in blocking))
  return {key: path for key, path in zip(MODALITY_KEYS, case.images) if path}


def _channel_names_from_json(path):
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise PredictionError(f'{path}: cannot read as JSON: {e}') from e
  names = data.get('channel_names') or data.get('modality') if isinstance(data, dict) else None
  if not isinstance(names, dict) or not names:
    raise PredictionError(f'{path}: no "channel_names" (nnU-Net v2) or "modality" (MSD) entry')
  try:
    return {int(k): v for k, v in names.items()}
  except ValueError as e:
    raise PredictionError(f'{path}: channel numbers must be integers: {e}') from e


def channel_order(channels=None, dataset_json=None, input_dir=None):
  """{channel number in the file names: modality index 0-3} from ``channels`` ('FLAIR,T1,
  T1Gd,T2': channel 0 is FLAIR...), else ``dataset_json``, else a dataset.json in
  ``input_dir`` or its parent, else FLAIR,T1,T1Gd,T2."""
  source = '--channels'
  if channels:
    names = dict(enumerate(n for n in channels.split(',')))
  else:
    candidates = [dataset_json] if dataset_json else [
        os.path.join(d, 'dataset.json') for d in (input_dir, os.path.dirname(
            os.path.abspath(input_dir)))] if input_dir else []
    found = [p for p in candidates if p and os.path.isfile(p)]
    if dataset_json and not found:
      raise PredictionError(f'--dataset_json {dataset_json}: no such file')
    if found:
      source, names = found[0], _channel_names_from_json(found[0])
    else:
      names = dict(enumerate(MODALITIES))
  order = {}
  for number, name in names.items():
    try:
      index = channel_index(name)
    except ValueError as e:
      raise PredictionError(f'{source}: channel {number}: {e}') from e
    if index in order.values():
      raise PredictionError(f'{source}: {MODALITIES[index]} is named by two channels')
    order[number] = index
  return order


def channel_file_cases(input_dir, order):
  """[(case id, {modality key: path})] of nnU-Net-style flat files in ``input_dir``; [] when
  there are none."""
  cases = {}
  for name in sorted(os.listdir(input_dir)):
    match = CHANNEL_FILE.match(name)
    if not match or not os.path.isfile(os.path.join(input_dir, name)):
      continue
    number = int(match.group('channel'))
    if number not in order:
      raise PredictionError(f'{os.path.join(input_dir, name)}: channel {number:04d} is not '
                            f'in the channel order {sorted(order)} (--channels or '
                            'dataset.json)')
    cases.setdefault(match.group('case'), {})[MODALITY_KEYS[order[number]]] = os.path.join(
        input_dir, name)
  return sorted(cases.items())


@dataclasses.dataclass
class FolderScan:
  """Every entry of an input folder, accounted for: ``cases`` [(case id, {modality key: path}
  or the PredictionError that stops it)], ``skipped`` [(entry, reason)] for entries that are
  no case, ``kinds`` {'nnU-Net-style files': n, 'case folders': n}."""
  cases: list
  skipped: list
  kinds: dict


# Files that describe an input folder rather than being part of a case.
_FOLDER_FILES = ('dataset.json',)


def _unused_files(input_dir, case):
  """[(entry, reason)] for the NIfTI files of a case folder that are none of its scans (a copy,
  a mask, a second series): they are not read, and the user is told so."""
  used = {os.path.basename(p) for p in case.files}
  out = []
  for name in sorted(os.listdir(case.folder)):
    if name in used or layouts.strip_nifti_suffix(name) is None:
      continue
    entry = os.path.relpath(os.path.join(case.folder, name), input_dir)
    out.append((entry, f'a NIfTI file in case folder {case.case_id} that is none of its scans '
                       f'or its label (names such as {case.case_id}_flair.nii.gz or '
                       f'{case.case_id}-t2f.nii.gz); not read'))
  return out


def scan_input_folder(input_dir, channels=None, dataset_json=None) -> FolderScan:
  """Finds every case under ``input_dir``: nnU-Net-style flat files (CASE_0000.nii.gz ...) and
  BraTS case folders, both in one folder if need be. Every other entry is listed in
  ``skipped`` with the reason (a folder without NIfTI files, a file that is not a NIfTI image
  or not named as a channel file, a NIfTI file in a case folder that is none of its scans);
  hidden entries and dataset.json are not cases."""
  if not os.path.isdir(input_dir):
    raise PredictionError(f'--input_dir {input_dir}: no such folder')
  flat = channel_file_cases(input_dir, channel_order(channels, dataset_json, input_dir))
  if (channels or dataset_json) and not flat:
    raise PredictionError(f'--input_dir {input_dir}: no files named CASE_0000.nii.gz '
                          '(--channels and --dataset_json are for nnU-Net-style inputs)')
  cases = list(flat)
  skipped = []
  folders = 0
  for name in sorted(os.listdir(input_dir)):
    path = os.path.join(input_dir, name)
    if name.startswith('.') or name in _FOLDER_FILES:
      continue
    if os.path.isdir(path):
      try:
        found = layouts.discover_cases(path, 'auto')
      except layouts.DataError:
        skipped.append((name + '/', 'a folder without .nii / .nii.gz files'))
        continue
      for case in found:
        folders += 1
        try:
          cases.append((case.case_id, _case_paths(case)))
        except PredictionError as e:
          cases.append((case.case_id, e))
        skipped += _unused_files(input_dir, case)
    elif CHANNEL_FILE.match(name):
      continue                     # one of the flat cases above
    elif layouts.strip_nifti_suffix(name) is not None:
      skipped.append((name, 'a NIfTI file that is not named as a channel file '
                            '(<case id>_0000.nii.gz, nnU-Net style) nor inside a case folder'))
    else:
      skipped.append((name, 'not a NIfTI image'))
  seen = {}
  for case_id, _ in cases:
    seen[case_id] = seen.get(case_id, 0) + 1
  twice = sorted(c for c, n in seen.items() if n > 1)
  if twice:
    raise PredictionError(f'--input_dir {input_dir}: case id(s) found twice (as flat files and '
                          f'as a folder, or in two folders): {", ".join(twice[:5])}')
  if not cases:
    raise PredictionError(f'--input_dir {input_dir}: no case found (expected BraTS case '
                          'folders such as <ID>/<ID>_flair.nii.gz or nnU-Net-style files '
                          'CASE_0000.nii.gz .. CASE_0003.nii.gz)'
                          + (f'; {len(skipped)} entr(ies) skipped' if skipped else ''))
  kinds = {'nnU-Net-style files': len(flat), 'case folders': folders}
  return FolderScan(sorted(cases, key=lambda c: c[0]), skipped, kinds)


def folder_cases(input_dir, channels=None, dataset_json=None):
  """[(case id, {modality key: path} or a PredictionError)] of every case under
  ``input_dir`` (``scan_input_folder`` without the skipped entries)."""
  return scan_input_folder(input_dir, channels, dataset_json).cases


def paths_only(cases):
  return {c: list(p.values()) for c, p in cases if not isinstance(p, PredictionError)}


def preprocess(model, given, case_id, resample_to):
  """(image box, meta, {modality: field-of-view coverage} of the resampled ones)."""
  with tempfile.TemporaryDirectory(prefix='mstkd_regrid_') as folder:
    coverage = {}
    try:
      if resample_to:
        given, coverage = regrid.onto_grid_of(given, resample_to, folder)
      image, meta = pipeline.preprocess_patient(given, model.config, case_id=case_id)
    except layouts.BadCaseError as e:
      message = '; '.join(str(p) for p in e.problems)
      if 'affine differs' in message or 'differs from' in message:
        message += (' (series of one patient on different voxel grids: --resample_to '
                    'MODALITY brings the others onto that modality\'s grid)')
      raise PredictionError(message) from e
    except (ValueError, cli.InputError) as e:
      raise PredictionError(str(e)) from e
  return image, meta, coverage
