"""BraTS 2025 lesion-wise metrics: the official ``brats-evaluation`` package, called as it is.

Since 2025 the BraTS segmentation challenges are scored by the official package
``brats-evaluation`` (https://github.com/BraTS/BraTS_evaluation, PyPI ``brats-evaluation``),
which runs ``panoptica`` (https://github.com/BrainLesion/panoptica) with a bundled config per
challenge. Its lesion-wise metrics are defined differently from the 2023 ones
(``lesionwise.py``):

* instances are the connected components of each region in the reference and the prediction
  (no dilation, no minimum volume);
* they are paired one to one by maximum bipartite matching on Dice (any overlap, Dice > 1e-6);
* lesion-wise Dice / NSD / HD95 are the means over the matched pairs (panoptica's segmentation
  quality ``sq_dsc``, ``sq_nsd``, ``sq_hd95``; its HD95 pools the surface-voxel distances of
  both directions, as MedPy); the panoptic quality ``pq_dsc`` = ``sq_dsc`` x F1 of the
  detection; TP / FN / FP count matched, unmatched reference and unmatched predicted
  instances. No instance in either mask: NaN; no match (but some instance): Dice and NSD 0,
  HD95 inf;
* for BraTS-MET the official parser averages over the reference lesions of at least 20 mm^3
  and the false positives, unmatched lesions and false positives counting Dice 0, HD95 373.

This module only builds the inputs, calls ``brats_evaluation.evaluate_single_exam`` with the
evaluator of the bundled config, and writes the JSON that ``brats-evaluate`` writes; the
numbers are then read from the CSV written by the official parser (``parse_seg_results``,
``parse_mets_results`` for BraTS-MET), as ``brats-parse-metrics`` writes it. The package is the
optional extra ``brats`` (``pip install ".[brats]"`` in a checkout, or
``pip install brats-evaluation panoptica``).

What differs from running ``brats-evaluate`` on the files: the label files are read by this
project (``--labels``: BraTS 2024 or 2021 codes), and the WT / TC / ET regions are handed to
panoptica as an image in the 2024 codes (3 ET, 1 the rest of TC, 2 the rest of WT), as in-memory
NIfTI images with the reference's affine and voxel size. Only WT, TC and ET are reported. On
anisotropic voxels ``brats-evaluate`` (SimpleITK arrays come in reversed axis order, the voxel
size does not) applies each voxel size to another axis; here each axis keeps its own.
"""

import contextlib
import csv
import io
import json
import logging
import os
import warnings

import nibabel as nib
import numpy as np

from mstkd_jax import cli

# The ``brats`` extra of pyproject.toml (tests/test_evaluate_folder.py keeps them equal).
EXTRA_REQUIREMENTS = ('brats-evaluation>=0.0.10', 'panoptica>=2.1.7')
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install_hint():
  """The command that installs the extra for how mstkd_jax was installed: the packages
  themselves (mstkd-jax is on no package index), or ``pip install ".[brats]"`` from a
  checkout (a folder with pyproject.toml above the package)."""
  direct = 'pip install ' + ' '.join(f'"{r}"' for r in EXTRA_REQUIREMENTS)
  if os.path.exists(os.path.join(CHECKOUT, 'pyproject.toml')):
    return f'{direct} (or, in the checkout {CHECKOUT}: pip install ".[brats]")'
  return direct
# --challenge -> the package's bundled config. SSA uses the glioma labels; BraTS-PED is left
# out: its config reads the paediatric codes (1 ET, 2 NETC, 3 CC, 4 ED), which --labels does
# not.
CONFIGS = {'BraTS-GLI': 'gli', 'BraTS-SSA': 'gli', 'BraTS-MEN': 'MenPre', 'BraTS-MET': 'mets'}
# The official MET parser's defaults (brats-parse-metrics mets).
METS_VOLUME_THRESHOLD, METS_OVERLAP_THRESHOLD = 20.0, 0.1
REGION_GROUPS = {'WT': 'wt', 'TC': 'tc', 'ET': 'et'}
# Columns of lesion_wise_brats2025.csv and where each comes from in the official CSV
# ({} = the panoptica group: wt, tc, et); pq comes from the JSON (not in the CSV).
CSV_SOURCES = {
    'lesion_dice': 'lesionwise_dsc_mean_{}', 'lesion_nsd': 'lesionwise_nsd_mean_{}',
    'lesion_hd95': 'lesionwise_hd95_mean_{}', 'num_tp': 'all_instance_tp_{}',
    'num_fn': 'all_instance_fn_{}', 'num_fp': 'all_instance_fp_{}',
    'global_dice': 'global_dsc_{}', 'global_nsd': 'global_nsd_{}',
    'global_hd95': 'global_hd95_{}'}
COLUMNS = ('case', 'region', 'lesion_dice', 'lesion_nsd', 'lesion_hd95', 'pq', 'num_tp',
           'num_fn', 'num_fp', 'global_dice', 'global_nsd', 'global_hd95')
JSON_NAME, OFFICIAL_CSV_NAME = 'brats2025_panoptica.json', 'brats2025_metrics.csv'


class MissingExtraError(cli.InputError, ImportError):
  """brats-evaluation (and so panoptica) is not installed."""


def config_name(challenge):
  if challenge not in CONFIGS:
    raise ValueError(f'--lesion_wise=brats2025 has no official config for {challenge!r}; use '
                     f'one of {sorted(CONFIGS)} (BraTS-PED: brats-evaluate --config ped on '
                     'files in the paediatric label codes)')
  return CONFIGS[challenge]


def _modules():
  """(brats_evaluation, panoptica), or a MissingExtraError saying how to install them."""
  try:
    import brats_evaluation  # pylint: disable=import-outside-toplevel
    import panoptica  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise MissingExtraError('--lesion_wise=brats2025 needs the official BraTS evaluation '
                            f'package, which is not installed ({cli.one_line(e)}): '
                            f'{install_hint()}') from e
  return brats_evaluation, panoptica


def versions():
  """'brats-evaluation X, panoptica Y' of the installed packages."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  return ', '.join(f'{name} {metadata.version(name)}'
                   for name in ('brats-evaluation', 'panoptica'))


@contextlib.contextmanager
def _quiet():
  """Keeps the packages' console output (progress prints, the duplicate-label notice of the
  glioma config, the NSD default-threshold warning) out of the command's output."""
  logger = logging.getLogger('panoptica')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
      warnings.simplefilter('ignore')
      yield
  finally:
    logger.setLevel(level)


def load_evaluator(challenge):
  """The official evaluator (the bundled config of ``challenge``)."""
  name = config_name(challenge)
  brats_evaluation, panoptica = _modules()
  reminder = getattr(panoptica, 'utils', None)
  disable = getattr(getattr(reminder, 'citation_reminder', None), 'disable_citation_reminder',
                    None)
  if disable is not None:          # evaluate_folder names panoptica and its citation itself
    disable()
  with _quiet():
    return panoptica.Panoptica_Evaluator.load_from_config(
        str(brats_evaluation.config_path(name)))


def label_image(regions):
  """uint8 labels in the BraTS 2024 codes of the WT / TC / ET boolean masks: 3 ET, 1 TC - ET,
  2 WT - TC (the glioma config's groups: et = {3}, tc = {1, 3}, wt = {1, 2, 3})."""
  out = np.zeros(np.shape(regions['WT']), np.uint8)
  out[np.asarray(regions['WT'], bool)] = 2
  out[np.asarray(regions['TC'], bool)] = 1
  out[np.asarray(regions['ET'], bool)] = 3
  return out


def _nifti(labels, affine, spacing):
  image = nib.Nifti1Image(labels, np.asarray(affine, np.float64))
  image.header.set_zooms(tuple(float(s) for s in spacing))
  return image


def evaluate_case(evaluator, case_id, pred_regions, ref_regions, affine, spacing):
  """The official result of one case (``evaluate_single_exam``'s dict: per panoptica group its
  metrics, and ``subject_name``)."""
  brats_evaluation, _ = _modules()
  pred = _nifti(label_image(pred_regions), affine, spacing)
  ref = _nifti(label_image(ref_regions), affine, spacing)
  with _quiet():
    result = brats_evaluation.evaluate_single_exam(pred, ref, case_id, evaluator)
  if 'error' in result:
    raise ValueError(f'{case_id}: brats-evaluation failed: {result["error"]}')
  return result


def _number(value):
  """A value of the official CSV (pandas writes NaN as '', infinity as 'inf') or JSON."""
  return float('nan') if value in ('', None) else float(value)


def write_official(results, challenge, out_dir):
  """Writes the official JSON and the official parser's CSV into ``out_dir``; returns the rows
  of lesion_wise_brats2025.csv (per case and region, ``COLUMNS``), read from that CSV."""
  brats_evaluation, _ = _modules()
  json_path = os.path.join(out_dir, JSON_NAME)
  csv_path = os.path.join(out_dir, OFFICIAL_CSV_NAME)
  with open(json_path, 'w') as f:
    json.dump({'metrics': results, 'missings': []}, f, indent=4)
  with _quiet():
    if config_name(challenge) == 'mets':
      brats_evaluation.parse_mets_results(json_path, METS_VOLUME_THRESHOLD,
                                          METS_OVERLAP_THRESHOLD, csv_path)
    else:
      brats_evaluation.parse_seg_results(json_path, csv_path)
  with open(csv_path, newline='') as f:
    official = list(csv.DictReader(f))[:len(results)]     # then its mean / std / median rows
  rows = []
  for result, line in zip(results, official):
    for region, group in REGION_GROUPS.items():
      row = {'case': result['subject_name'], 'region': region}
      for key, source in CSV_SOURCES.items():
        value = _number(line[source.format(group)])
        row[key] = int(value) if key.startswith('num_') and np.isfinite(value) else value
      row['pq'] = _number(result[group].get('pq_dsc'))
      rows.append(row)
  return rows
