r"""Segment new patients with a trained student: NIfTI in, NIfTI out in the input's geometry.

One patient (any non-empty subset of the four modalities; the BraTS 2021 names are aliases)::

    python -m mstkd_jax.predict --checkpoint runs/brats/export \
        --t2f BraTS-GLI-00005-100-t2f.nii.gz --t1c BraTS-GLI-00005-100-t1c.nii.gz \
        --out seg.nii.gz [--save_probabilities] [--tta] [--labels brats2024|brats2021]

Every case under a folder::

    python -m mstkd_jax.predict --checkpoint runs/brats/export --input_dir /data/new \
        --out /data/new-segs [--continue]     # writes /data/new-segs/<case id>.nii.gz

The folder holds BraTS case folders (BraTS 2024 or 2021 file names; missing modalities are
simply absent, ``seg`` files are ignored) and/or, as nnU-Net expects, flat files
``CASE_0000.nii.gz`` .. ``CASE_0003.nii.gz``, one per channel number. The channel order of
flat files comes from ``--channels`` (default FLAIR,T1,T1Gd,T2), else from ``--dataset_json``
or a ``dataset.json`` in the folder or its parent (nnU-Net v2 ``channel_names`` or the MSD's
``modality``: e.g. {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}); a channel file that
is absent is a missing modality. Every entry of the folder is accounted for: it is a case, or
it is listed as skipped with the reason (a folder without NIfTI files, a file that is not a
NIfTI image or not named as a channel file), and any skipped entry or failed case makes the
exit status 1. Output files are named ``<case id>.nii.gz``, the names BraTS submissions expect
(BraTS-GLI-00001-000.nii.gz, BraTS2021_00001.nii.gz). ``--continue`` skips cases whose output
exists (a restarted job carries on).

``--checkpoint`` is an exported student (``--mode=export``) or a training workdir (then
``--step latest|best|N`` picks the checkpoint). The preprocessing (intensity scaling, voxel
spacing, the box around the brain) comes from the checkpoint's config, so no config is needed;
``--config`` only checks that the checkpoint is the one expected.

What comes out:

* the segmentation has the input's exact shape, affine and header (data type uint8); voxels
  outside the box the model saw are background;
* labels, one convention for the whole run, printed in the summary: ``brats2024`` 1 NETC,
  2 SNFH, 3 ET; ``brats2021`` (also FeTS, BraTS 2018-2021) 1 NCR, 2 ED, 4 ET. Default: the
  convention of the cases the model was trained on (recorded at training, carried by the
  export); a model trained on both needs ``--labels``. For models that do not record it: the
  config's data layout, else the input file names when all cases agree (an error when they
  do not), else the option names used (--flair...: brats2021), else brats2024;
* each voxel gets the label of the innermost region it is in: ET if the ET channel is on, else
  NETC/NCR if the core channel is on, else SNFH/ED if the oedema channel is on. The regions nest
  (ET within TC within WT), so WT, TC and ET computed back from the written labels are exactly
  the unions of thresholded channels the metrics use (WT = ch0|ch1|ch2, TC = ch0|ch2, ET = ch2);
* beside each segmentation, ``<out>.json`` (the sidecar; docs/evaluation.md lists its fields):
  the input files, the modalities used and missing, the label convention and why, the tumour
  volumes in mL (WT, TC, ET and each label, from the voxel size), the model, and the expected
  accuracy: the Dice / HD95 the model scored in its own 15-subset evaluation with exactly the
  modalities at hand (when the export carries that evaluation). Folder mode also writes
  ``volumes.csv``, one row per case;
* where the brain box is larger than the model's input, overlapping windows (``--overlap``,
  default 0.5) are blended with Gaussian weights (``--blend uniform`` for plain averaging);
* ``--tta``: test-time mirroring, the mean of the predictions for the 8 mirrorings of the input
  (each mirrored back; 8 network passes: about 6x a full-size case's time on a CPU), and
  ``<out>_uncertainty.nii.gz``, the share of the 8 whose thresholded channels differ from the
  result at each voxel (0 = all agree);
* ``--resample_to MODALITY``: series of one patient on different voxel grids (a 1 mm T1Gd
  and a 5 mm FLAIR of one session) are resampled onto that modality's grid by their affines
  (trilinear, no registration; ``regrid.py``); volumes that do not overlap in world space
  are refused (not co-registered). The output is in that modality's geometry;
* ``--report``: a one-page picture per case (``<out>_report.png``): axial, coronal and
  sagittal slices through the tumour's centre with the predicted regions over the T1Gd (else
  FLAIR, T2, T1), the volumes, the modalities used, the label convention and the expected
  Dice;
* ``--save_probabilities`` also writes the four sigmoid channels (NETC/NCR, SNFH/ED, ET,
  background) as a float32 4D NIfTI in the same geometry (``<out>_probs.nii.gz``); when the
  model works at another voxel size they are resampled trilinearly, and the segmentation is the
  thresholded resampled probabilities.

Errors are reported in one line (exit status 2): no modality given, a missing or unreadable
file, a file that looks like a label map or mask rather than a scan, files of different shapes
or affines, a checkpoint trained with another config, an unknown label convention.
"""

import csv
import dataclasses
import itertools
import json
import os
import re
import sys
import tempfile
import time
from typing import Optional

from absl import flags, logging
import numpy as np

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import cli
from mstkd_jax import compile_cache
from mstkd_jax import configs
from mstkd_jax import evaluate
from mstkd_jax import model_facts
from mstkd_jax import regrid
from mstkd_jax.data import layouts, pipeline
from mstkd_jax.fileio import write_json_atomic
from mstkd_jax.logging_utils import Progress
from mstkd_jax.modalities import LEGACY_KEYS, MODALITIES, MODALITY_KEYS, channel_index, subset_name

# Command-line names of each channel (FLAIR, T1, T1Gd, T2): BraTS 2024 first, then 2021.
CHANNEL_OPTIONS = tuple(zip(MODALITY_KEYS, LEGACY_KEYS))
LABEL_CHOICES = ('auto', 'brats2024', 'brats2021')
# nnU-Net's file names: <case id>_<4-digit channel number>.nii(.gz).
CHANNEL_FILE = re.compile(r'^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$')
DEFAULT_CHANNELS = ','.join(MODALITIES)


class PredictionError(ValueError):
  """A problem with the inputs or the checkpoint, with a message meant for the user."""


@dataclasses.dataclass
class Model:
  """A loaded network: its config, variables (placed on the devices), inference, where it came
  from, and what it says about itself (``model_facts.ModelFacts``: the label convention of its
  training cases, its 15-subset evaluation)."""
  config: object
  variables: dict
  inference: object
  source: str
  facts: model_facts.ModelFacts = None
  location: str = ''


def load_config_file(spec):
  """A config name (``brats:tiny``) or ``path/to/config.py[:variant]`` -> ConfigDict (as
  ``--config`` of the training command)."""
  file = configs.resolve(spec).partition(':')[0]
  root = os.path.dirname(os.path.dirname(os.path.abspath(file)))
  if root not in sys.path:     # a config file beside the project's may import its siblings
    sys.path.insert(0, root)
  try:
    return configs.load(spec)
  except FileNotFoundError as e:
    raise PredictionError(str(e)) from e


def load_model(checkpoint, step=None, config=None, batch_size=None) -> Model:
  """An exported student or a training workdir's student (``step``: latest, best or N), read
  by ``checkpoint.load_networks``. ``config`` (optional) must be compatible with the
  checkpoint's own (``checkpoint.check_compatible``); the checkpoint's own is used."""
  if not os.path.isdir(checkpoint):
    raise PredictionError(f'checkpoint {checkpoint} is not a folder (an exported student or a '
                          'training workdir)')
  try:
    saved = ckpt.load_config(checkpoint)
  except FileNotFoundError as e:
    raise PredictionError(str(e)) from e
  if config is not None:
    ckpt.check_compatible(config, saved, checkpoint)
  if ckpt.is_network_export(checkpoint) and step not in (None, 'latest'):
    raise PredictionError(f'{checkpoint} is an exported network: --step does not apply')
  try:
    loaded = ckpt.load_networks(saved, checkpoint, step, names=('student',))
  except FileNotFoundError as e:
    raise PredictionError(str(e)) from e
  except (ValueError, KeyError) as e:
    raise PredictionError(f'cannot load the network from {checkpoint}: its weights do not fit '
                          f'its config.json (a checkpoint from another config?): {e}') from e
  inference = evaluate.get_inference(saved, batch_size)
  return Model(saved, inference.place(loaded.primary()), inference, loaded.source,
               model_facts.read(checkpoint, saved), os.path.abspath(checkpoint))


def _layout_from_names(paths):
  """'brats2021' / 'brats2024' when every named file follows one convention, else None."""
  votes = set()
  for path in paths:
    stem = (layouts.strip_nifti_suffix(os.path.basename(str(path))) or '').lower()
    for layout in ('brats2021', 'brats2024'):
      lay = layouts.get_layout(layout)
      if any(stem == key or stem.endswith(lay.sep + key) for key in lay.image_keys):
        votes.add(layout)
  return votes.pop() if len(votes) == 1 else None


@dataclasses.dataclass(frozen=True)
class LabelChoice:
  """The label convention a prediction run writes, and why."""
  layout: str
  source: str

  def describe(self):
    values = ', '.join(f'{v} {n}' for n, v in LABEL_NAMES[self.layout])
    return f'{self.layout} labels ({values}), by {self.source}'


# Written label value of each region, per convention (innermost region wins, see
# ``probs_to_labels``).
LABEL_NAMES = {'brats2021': (('NCR', 1), ('ED', 2), ('ET', 4)),
               'brats2024': (('NETC', 1), ('SNFH', 2), ('ET', 3))}


def resolve_labels(labels, config_or_model, cases_paths, option_names=()) -> LabelChoice:
  """The one label convention of a prediction run.

  ``labels``: 'brats2021' / 'brats2024' wins. 'auto': the convention the model's training
  cases used (recorded with the model; an error if they mixed both), else the config's layout,
  else the input file names when every case of the run agrees (an error naming the cases when
  they do not), else the option names used (--flair...: brats2021), else brats2024.
  ``cases_paths``: {case id: iterable of paths}, or one iterable of paths (one case).
  """
  if labels not in LABEL_CHOICES:
    raise PredictionError(f'--labels must be one of {LABEL_CHOICES}, got {labels!r}')
  if labels != 'auto':
    return LabelChoice(labels, '--labels')
  facts = getattr(config_or_model, 'facts', None)
  config = getattr(config_or_model, 'config', config_or_model)
  if facts is not None and facts.label_convention == layouts.MIXED:
    raise PredictionError(f'the model was trained on cases of both label conventions '
                          f'({facts.label_source}); choose the one to write with --labels '
                          'brats2021 (1 NCR, 2 ED, 4 ET) or --labels brats2024 (1 NETC, '
                          '2 SNFH, 3 ET)')
  if facts is not None and facts.label_convention:
    return LabelChoice(layouts.get_layout(facts.label_convention).name, facts.label_source)
  layout = str(config.data.get('layout', 'auto') or 'auto')
  if layout != 'auto':
    return LabelChoice(layouts.get_layout(layout).name, "the model config's data.layout")
  if not isinstance(cases_paths, dict):
    cases_paths = {'patient': cases_paths}
  by_case = {case_id: _layout_from_names(paths) for case_id, paths in cases_paths.items()}
  found = {v for v in by_case.values() if v}
  if len(found) > 1:
    example = {v: next(c for c, w in by_case.items() if w == v) for v in sorted(found)}
    raise PredictionError('the model does not record its label convention and the input file '
                          'names follow both (' + ', '.join(f'{c}: {v}' for v, c in
                                                           example.items())
                          + '); give --labels brats2021 or --labels brats2024')
  if found:
    return LabelChoice(found.pop(), 'the input file names (the model does not record its '
                       'convention)')
  names = {str(n).lower() for n in option_names}
  if names and names <= set(LEGACY_KEYS):
    return LabelChoice('brats2021', 'the option names used (the model does not record its '
                       'convention)')
  return LabelChoice('brats2024', 'default (the model does not record its convention)')


def probs_to_labels(probs, layout, threshold=0.5):
  """[..., >=3] channel probabilities -> uint8 labels of ``layout`` (innermost region wins)."""
  probs = np.asarray(probs)
  netc, snfh, et = (probs[..., c] > threshold for c in range(3))
  codes = np.zeros(probs.shape[:-1], np.uint8)
  codes[snfh] = layouts.EDEMA
  codes[netc] = layouts.CORE
  codes[et] = layouts.ENHANCING
  return layouts.codes_to_labels(codes, layout)


@dataclasses.dataclass
class Prediction:
  labels: np.ndarray          # original grid, uint8 label values of ``layout``
  probabilities: np.ndarray   # original grid, float32 [..., 4]
  layout: str
  meta: dict
  present: tuple              # which modalities were given
  label_source: str = ''      # why ``layout`` (LabelChoice.source)
  uncertainty: Optional[np.ndarray] = None   # original grid, float32 (with tta)
  tta: bool = False
  inputs: dict = dataclasses.field(default_factory=dict)   # {modality name: path}
  seconds: float = 0.0
  resampled_to: Optional[str] = None     # the modality whose grid the others were put on
  coverage: dict = dataclasses.field(default_factory=dict)  # {resampled modality: share}


def _check_paths(paths):
  given = {k: v for k, v in paths.items() if v}
  if not given:
    raise PredictionError('no modality given: pass at least one of --t2f/--flair, --t1n/--t1, '
                          '--t1c/--t1ce, --t2w/--t2')
  missing = [str(p) for p in given.values() if not os.path.isfile(p)]
  if missing:
    raise PredictionError(f'file(s) not found: {", ".join(missing)}')
  return given


def check_out(out, folder=False):
  """The output must be a .nii / .nii.gz file (or, with ``folder``, a folder), never an
  existing folder where a file is wanted. A file's missing folder is created, as ``folder``
  mode creates its folder."""
  if folder:
    if os.path.exists(out) and not os.path.isdir(out):
      raise PredictionError(f'--out {out} exists and is not a folder (--input_dir writes one '
                            'file per case into a folder)')
    return
  if os.path.isdir(out):
    raise PredictionError(f'--out {out} is a folder; give a file name ending in .nii.gz')
  if not out.endswith(('.nii.gz', '.nii')):
    raise PredictionError(f'--out {out}: the segmentation is written as NIfTI; give a name '
                          'ending in .nii.gz or .nii')
  parent = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise PredictionError(f'--out {out}: cannot create the folder {parent}: '
                          f'{e.strerror or e}') from e


# The 8 mirrorings of test-time augmentation: every combination of flipping the 3 axes.
MIRRORS = tuple(itertools.product((False, True), repeat=3))


def _flip(array, flips):
  """Flips the spatial axes 1-3 of [n, x, y, z, ...] where ``flips`` says so."""
  return array[(slice(None),) + tuple(slice(None, None, -1) if f else slice(None)
                                      for f in flips)]


def box_probabilities(model, image, overlap=None, blend=None, tta=False):
  """Sigmoid probabilities [bx, by, bz, C] of one preprocessed box [bx, by, bz, 4]; with
  ``tta`` the mean over the 8 mirrored inputs (each mirrored back), and the per-voxel share of
  mirrored predictions whose thresholded channels differ from the mean's (else None)."""
  if not tta:
    return model.inference.predict(model.variables, image[None], overlap=overlap,
                                   blend=blend)[0], None
  mirrored = np.concatenate([_flip(image[None], f) for f in MIRRORS])
  outputs = model.inference.predict(model.variables, mirrored, overlap=overlap, blend=blend)
  outputs = np.stack([_flip(o[None], f)[0] for o, f in zip(outputs, MIRRORS)])
  mean = outputs.mean(axis=0)
  final = mean[..., :3] > 0.5
  disagree = np.mean([np.any((o[..., :3] > 0.5) != final, axis=-1) for o in outputs], axis=0)
  return mean, disagree.astype(np.float32)


def _preprocess(model, given, case_id, resample_to):
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


def predict_files(model: Model, paths, labels='auto', threshold=0.5, overlap=None, blend=None,
                  case_id='patient', option_names=(), tta=False,
                  resample_to=None) -> Prediction:
  """Segments one patient: ``paths`` maps modality names (FLAIR/t2f/flair, T1/t1n/t1,
  T1Gd/t1c/t1ce, T2/t2w/t2) to NIfTI files, any non-empty subset. ``labels``: a
  ``LabelChoice`` of the run, or a --labels value resolved for this case alone.
  ``resample_to``: a modality whose voxel grid the others are resampled onto first
  (``regrid.onto_grid_of``); the output is then in its geometry."""
  started = time.time()
  given = _check_paths(paths)
  choice = labels if isinstance(labels, LabelChoice) else resolve_labels(
      labels, model, given.values(), option_names)
  image, meta, coverage = _preprocess(model, given, case_id, resample_to)
  box_probs, box_disagreement = box_probabilities(model, image, overlap, blend, tta)
  probs = pipeline.restore_geometry(box_probs, meta, order=1).astype(np.float32)
  # Outside the box the model saw nothing: background with probability 1 there.
  seen = pipeline.restore_geometry(np.ones(box_probs.shape[:3], np.float32), meta, order=1)
  probs[..., 3] += 1.0 - seen
  seg = probs_to_labels(probs, choice.layout, threshold)
  uncertainty = None
  if box_disagreement is not None:
    uncertainty = pipeline.restore_geometry(box_disagreement, meta, order=1).astype(np.float32)
  inputs = {MODALITIES[channel_index(k)]: os.path.abspath(v) for k, v in given.items()}
  return Prediction(seg, probs, choice.layout, meta, tuple(meta['present']), choice.source,
                    uncertainty, tta, inputs, time.time() - started,
                    MODALITIES[channel_index(resample_to)] if resample_to else None, coverage)


def voxel_volume_ml(meta):
  """The volume of one voxel of the original grid, in mL (|det| of the affine's 3x3, mm^3)."""
  affine = np.asarray(meta['original_affine'], np.float64)
  return float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0


def tumour_volumes(prediction: Prediction):
  """{name: mL} of the regions (WT, TC, ET) and of each written label (NCR/NETC, ED/SNFH, ET)
  of a prediction, from its labels and voxel size."""
  voxel = voxel_volume_ml(prediction.meta)
  codes = layouts.labels_to_codes(prediction.labels, prediction.layout)
  out = {region: float(mask.sum()) * voxel
         for region, mask in layouts.region_masks(codes).items()}
  for name, value in LABEL_NAMES[prediction.layout]:
    out[name] = float(np.count_nonzero(prediction.labels == value)) * voxel
  return {k: round(v, 3) for k, v in out.items()}


def write_prediction(prediction: Prediction, out, save_probabilities=False):
  """Writes the segmentation (and ``<out>_probs.nii.gz``, with TTA ``<out>_uncertainty.nii.gz``);
  returns the written paths."""
  pipeline.write_nifti(prediction.labels, prediction.meta, out, dtype=np.uint8)
  written = [out]
  if save_probabilities:
    path = probabilities_path(out)
    pipeline.write_nifti(prediction.probabilities, prediction.meta, path, dtype=np.float32)
    written.append(path)
  if prediction.uncertainty is not None:
    path = _with_suffix(out, '_uncertainty')
    pipeline.write_nifti(prediction.uncertainty, prediction.meta, path, dtype=np.float32)
    written.append(path)
  return written


def sidecar_path(out):
  """``<out>.json`` beside ``<out>.nii.gz``."""
  for suffix in ('.nii.gz', '.nii'):
    if out.endswith(suffix):
      return out[:-len(suffix)] + '.json'
  return out + '.json'


def case_record(prediction: Prediction, model: Model, case_id, written, threshold=0.5):
  """What a user needs beside the label map, as the sidecar JSON of one case."""
  subset = subset_name(prediction.present)
  expected = model.facts.expected(subset) if model.facts else None
  record = {
      'case_id': case_id,
      'outputs': [os.path.abspath(p) for p in written],
      'inputs': {m: prediction.inputs.get(m) for m in MODALITIES},
      'modalities_used': subset,
      'modalities_missing': [m for m, p in zip(MODALITIES, prediction.present) if not p],
      'labels': {'convention': prediction.layout, 'source': prediction.label_source,
                 'values': dict(LABEL_NAMES[prediction.layout])},
      'volumes_ml': tumour_volumes(prediction),
      'voxel_volume_ml': round(voxel_volume_ml(prediction.meta), 6),
      'expected_accuracy': None,
      'model': {'checkpoint': model.location, 'source': model.source},
      'threshold': threshold,
      'test_time_mirroring': prediction.tta,
      'resampled_to_grid_of': prediction.resampled_to,
      'field_of_view_coverage': prediction.coverage,
      'seconds': round(prediction.seconds, 2),
  }
  if expected:
    evaluation = model.facts.evaluation
    record['expected_accuracy'] = {
        'modalities': subset, 'split': evaluation.get('split'),
        'evaluated': evaluation.get('source'),
        'num_cases': max(int(v.get('num_cases', 0)) for v in expected.values()),
        'dice': {r: round(v['dice'], 4) for r, v in expected.items()},
        'hd95_mm': {r: round(v['hd95'], 2) for r, v in expected.items()},
        'hd95_convention': evaluation.get('hd95_convention')}
  return record


def write_case_report(prediction: Prediction, record, out):
  """``<out>_report.png``: the one-page picture of the case (visualize.draw_case_report), over
  the T1Gd if given (else FLAIR, T2, T1) on the output's grid."""
  from mstkd_jax import visualize  # pylint: disable=import-outside-toplevel
  if prediction.resampled_to:
    background = prediction.inputs[prediction.resampled_to]
  else:
    background = next(prediction.inputs[m] for m in visualize.REPORT_BACKGROUND
                      if prediction.inputs.get(m))
  path = sidecar_path(out)[:-len('.json')] + '_report.png'
  return visualize.draw_case_report(background, prediction.labels, prediction.layout, record,
                                    path)


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


def write_sidecar(record, out):
  path = sidecar_path(out)
  write_json_atomic(path, record, indent=2)
  return path


def _with_suffix(out, suffix):
  for ext in ('.nii.gz', '.nii'):
    if out.endswith(ext):
      return out[:-len(ext)] + suffix + ext
  return out + suffix + '.nii.gz'


def probabilities_path(out):
  return _with_suffix(out, '_probs')


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


def scan_input_folder(input_dir, channels=None, dataset_json=None) -> FolderScan:
  """Finds every case under ``input_dir``: nnU-Net-style flat files (CASE_0000.nii.gz ...) and
  BraTS case folders, both in one folder if need be. Every other entry is listed in
  ``skipped`` with the reason (a folder without NIfTI files, a file that is not a NIfTI image
  or not named as a channel file); hidden entries and dataset.json are not cases."""
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


def _paths_only(cases):
  return {c: list(p.values()) for c, p in cases if not isinstance(p, PredictionError)}


VOLUME_COLUMNS = ('case_id', 'modalities_used', 'label_convention', 'WT_ml', 'TC_ml', 'ET_ml')


def write_volumes_csv(records, path):
  """One row per case: the modalities used, the label convention, the region volumes and each
  label's volume in mL (the columns of docs/evaluation.md)."""
  label_columns = []
  for record in records:
    for name in record['volumes_ml']:
      column = f'{name}_ml'
      if column not in VOLUME_COLUMNS and column not in label_columns:
        label_columns.append(column)
  columns = list(VOLUME_COLUMNS) + label_columns + ['dice_expected_WT', 'dice_expected_TC',
                                                    'dice_expected_ET']
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for record in records:
      row = {'case_id': record['case_id'], 'modalities_used': record['modalities_used'],
             'label_convention': record['labels']['convention']}
      row.update({f'{k}_ml': v for k, v in record['volumes_ml'].items()})
      expected = (record.get('expected_accuracy') or {}).get('dice', {})
      row.update({f'dice_expected_{r}': expected.get(r, '') for r in ('WT', 'TC', 'ET')})
      writer.writerow(row)
  os.replace(tmp, path)
  return path


def _read_sidecar(out):
  try:
    with open(sidecar_path(out)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def predict_folder(model, cases, out_dir, labels='auto', save_probabilities=False,
                   skip_existing=False, report=False, **kwargs):
  """Segments ``cases`` (from ``folder_cases``) into ``out_dir/<case id>.nii.gz`` with a
  ``<case id>.json`` sidecar each and ``volumes.csv`` over the folder; one label convention
  for the whole run (``resolve_labels``). ``skip_existing``: not the cases whose output
  exists. Returns (written paths, {case id: error message}, skipped case ids, LabelChoice,
  {case id: sidecar record})."""
  choice = labels if isinstance(labels, LabelChoice) else resolve_labels(
      labels, model, _paths_only(cases))
  os.makedirs(out_dir, exist_ok=True)
  written, failed, skipped = [], {}, []
  todo = []
  records = {}
  for case_id, paths in cases:
    out = os.path.join(out_dir, f'{case_id}.nii.gz')
    if skip_existing and os.path.exists(out):
      skipped.append(case_id)
      previous = _read_sidecar(out)
      if previous:
        records[case_id] = previous
    else:
      todo.append((case_id, paths, out))
  if skipped:
    print(f'--continue: {len(skipped)} case(s) already segmented in {out_dir}, '
          f'{len(todo)} to go', file=sys.stderr, flush=True)
  # A terminal gets a bar; logs (SLURM, pipes) one line per case with its time.
  bar = Progress(len(todo), 'predict', log_lines=False)
  lines = not sys.stderr.isatty()
  for case_id, paths, out in todo:
    try:
      if isinstance(paths, PredictionError):
        raise paths
      prediction = predict_files(model, paths, labels=choice, case_id=case_id, **kwargs)
      files = write_prediction(prediction, out, save_probabilities)
      record = case_record(prediction, model, case_id, files, kwargs.get('threshold', 0.5))
      if report:
        files.append(write_case_report(prediction, record, out))
        record['outputs'].append(os.path.abspath(files[-1]))
      files.append(write_sidecar(record, out))
      records[case_id] = record
      written += files
      if lines:
        volumes = record['volumes_ml']
        print(f'{case_id}: {prediction.seconds:.1f} s, {record["modalities_used"]}, WT / TC / '
              f'ET {volumes["WT"]:.1f} / {volumes["TC"]:.1f} / {volumes["ET"]:.1f} mL -> {out}',
              file=sys.stderr, flush=True)
    except PredictionError as e:
      failed[case_id] = str(e)
      logging.error('%s: %s', case_id, e)
    bar.update()
  bar.close()
  if records:
    written.append(write_volumes_csv([records[c] for c in sorted(records)],
                                     os.path.join(out_dir, 'volumes.csv')))
  return written, failed, skipped, choice, records


COMMAND = cli.Command('python -m mstkd_jax.predict', __doc__)


def _define_flags(fv):
  flags.DEFINE_string('checkpoint', None, 'Exported student folder (--mode=export) or training '
                      'workdir.', required=True, flag_values=fv)
  flags.DEFINE_string('step', None, "Training workdir only: 'latest' (default), 'best' or a "
                      'step number.', flag_values=fv)
  for names, what in zip(CHANNEL_OPTIONS, ('FLAIR', 'T1', 'T1Gd (T1ce)', 'T2')):
    flags.DEFINE_string(names[0], None, f'{what} NIfTI file (alias --{names[1]}).',
                        flag_values=fv)
    flags.DEFINE_alias(names[1], names[0], flag_values=fv)
  flags.DEFINE_string('input_dir', None, 'Segment every case under this folder instead: '
                      'BraTS case folders or nnU-Net-style CASE_0000.nii.gz .. '
                      'CASE_0003.nii.gz.', flag_values=fv)
  flags.DEFINE_string('channels', None, 'nnU-Net-style inputs: the modality of channel 0, 1, '
                      f'... (default: dataset.json, else {DEFAULT_CHANNELS}).', flag_values=fv)
  flags.DEFINE_string('dataset_json', None, 'nnU-Net dataset.json giving the channel order '
                      '(default: one in --input_dir or its parent).', flag_values=fv)
  flags.DEFINE_bool('continue', False, '--input_dir: skip cases whose output file exists.',
                    flag_values=fv)
  flags.DEFINE_string('out', None, 'Output .nii.gz (one patient) or folder (with '
                      '--input_dir).', required=True, flag_values=fv)
  flags.DEFINE_enum('labels', 'auto', LABEL_CHOICES, 'Label values to write: brats2024 (1 NETC, '
                    '2 SNFH, 3 ET) or brats2021 (1 NCR, 2 ED, 4 ET); auto: the checkpoint '
                    'config, else the file names.', flag_values=fv)
  flags.DEFINE_bool('save_probabilities', False, 'Also write the 4 sigmoid channels as float32 '
                    '<out>_probs.nii.gz.', flag_values=fv)
  flags.DEFINE_float('threshold', 0.5, 'Probability above which a region channel is on.',
                     flag_values=fv)
  flags.DEFINE_float('overlap', None, 'Sliding windows: overlap fraction (default '
                     'config.eval.overlap, 0.5).', flag_values=fv)
  flags.DEFINE_enum('blend', None, ('gaussian', 'uniform'), 'Sliding windows: how overlapping '
                    'windows are blended (default config.eval.blend).', flag_values=fv)
  flags.DEFINE_bool('tta', False, 'Test-time mirroring: average the 8 mirrorings of the input '
                    '(8 network passes) and write <out>_uncertainty.nii.gz, the share of mirrored '
                    'predictions that disagree with the result at each voxel.', flag_values=fv)
  flags.DEFINE_string('resample_to', None, 'Modalities on different voxel grids (one frame, '
                      'e.g. 1 mm T1Gd and 5 mm FLAIR): resample the others onto this '
                      "modality's grid by their affines (no registration); the output is in its "
                      'geometry.', flag_values=fv)
  flags.DEFINE_bool('report', False, 'Also a one-page picture per case (<out>_report.png): '
                    'three orthogonal slices through the tumour with the predicted regions, '
                    'the volumes, the modalities used and the expected Dice.', flag_values=fv)
  flags.DEFINE_integer('batch_size', None, 'Windows per forward pass.', flag_values=fv)
  flags.DEFINE_string('config', None, 'Optional configs/X.py[:variant] the checkpoint must be '
                      'compatible with.', flag_values=fv)


_define_flags(COMMAND.flags)


def _print_expected(model, record):
  expected = record.get('expected_accuracy')
  subset = record['modalities_used']
  if expected:
    dice = expected['dice']
    print(f'  expected accuracy with {subset}: Dice WT / TC / ET '
          f'{100 * dice.get("WT", float("nan")):.1f} / {100 * dice.get("TC", float("nan")):.1f}'
          f' / {100 * dice.get("ET", float("nan")):.1f} % on {expected["num_cases"]} '
          f'{expected["split"]} case(s) of this model\'s evaluation ({expected["evaluated"]})')
  else:
    print(f'  expected accuracy with {subset}: '
          + model_facts.describe_expected(model.facts, subset))


def main(argv=None):
  """Runs the command on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  compile_cache.enable()
  args = COMMAND.parse_flags_only(argv)
  logging.set_verbosity(logging.WARNING)
  options = {names[0]: getattr(args, names[0]) for names in CHANNEL_OPTIONS}
  used = []
  raw = sys.argv[1:] if argv is None else list(argv)
  for token in raw:
    name = token.split('=', 1)[0].lstrip('-').lower()
    if name in {n for names in CHANNEL_OPTIONS for n in names}:
      used.append(name)
  try:
    if args.input_dir and any(options.values()):
      raise PredictionError('give either modality files or --input_dir, not both')
    if not args.input_dir:
      _check_paths(options)
    check_out(args.out, folder=bool(args.input_dir))
    scan = (scan_input_folder(args.input_dir, args.channels, args.dataset_json)
            if args.input_dir else None)
    config = load_config_file(args.config) if args.config else None
    t0 = time.time()
    print(f'loading the network from {args.checkpoint} (the first forward pass compiles it)',
          file=sys.stderr, flush=True)
    model = load_model(args.checkpoint, args.step, config, args.batch_size)
    if args.resample_to:
      try:
        channel_index(args.resample_to)
      except ValueError as e:
        raise PredictionError(f'--resample_to: {e}') from e
    kwargs = dict(threshold=args.threshold, overlap=args.overlap, blend=args.blend,
                  tta=args.tta, resample_to=args.resample_to)
    if args.input_dir:
      choice = resolve_labels(args.labels, model, _paths_only(scan.cases))
      kinds = ', '.join(f'{n} {k}' for k, n in scan.kinds.items() if n)
      print(f'{len(scan.cases)} case(s) in {args.input_dir} ({kinds}); writing '
            f'{choice.describe()}', file=sys.stderr, flush=True)
      written, failed, skipped, choice, records = predict_folder(
          model, scan.cases, args.out, choice, args.save_probabilities,
          skip_existing=args['continue'].value, report=args.report, **kwargs)
      done = len(scan.cases) - len(failed) - len(skipped)
      print(f'{done} case(s) segmented into {args.out} in {time.time() - t0:.1f} s, '
            f'{choice.describe()}'
            + (f'; {len(skipped)} already done (--continue)' if skipped else '')
            + ('; per case: <case id>.json, all cases: volumes.csv' if done else ''))
      for subset in sorted({r['modalities_used'] for r in records.values()}):
        _print_expected(model, next(r for r in records.values()
                                    if r['modalities_used'] == subset))
      for entry, reason in scan.skipped:
        print(f'error: {entry}: skipped: {reason}', file=sys.stderr)
      for case_id, message in failed.items():
        print(f'error: {case_id}: {message}', file=sys.stderr)
      if failed or scan.skipped:
        print(f'error: {len(failed)} case(s) failed and {len(scan.skipped)} entr(ies) of '
              f'{args.input_dir} were skipped (listed above)', file=sys.stderr)
        return 1
      return 0
    choice = resolve_labels(args.labels, model, [p for p in options.values() if p], used)
    case_id = case_id_from_files(options.values())
    prediction = predict_files(model, options, labels=choice, case_id=case_id, **kwargs)
    written = write_prediction(prediction, args.out, args.save_probabilities)
    record = case_record(prediction, model, case_id, written, args.threshold)
    if args.report:
      written.append(write_case_report(prediction, record, args.out))
      record['outputs'].append(os.path.abspath(written[-1]))
    written.append(write_sidecar(record, args.out))
  except (PredictionError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except ValueError as e:  # config compatibility and other checks
    print(f'error: {e}', file=sys.stderr)
    return 2
  volumes = record['volumes_ml']
  print(f'{", ".join(written)}: {choice.describe()}, from {record["modalities_used"]} '
        f'({model.source}, {time.time() - t0:.1f} s)')
  print(f'  tumour volumes: WT {volumes["WT"]:.2f} mL, TC {volumes["TC"]:.2f} mL, '
        f'ET {volumes["ET"]:.2f} mL')
  _print_expected(model, record)
  return 0


def console_main():
  """The ``mstkd-predict`` command (``pip install .``)."""
  sys.exit(main())


if __name__ == '__main__':
  console_main()
