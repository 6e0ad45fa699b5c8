"""``--mode=export``: the student alone, for evaluation and prediction.

    python -m mstkd_jax.main --config=configs/brats.py --workdir=runs/brats --mode=export \
        [--checkpoint=best] [--out=runs/brats/student]

writes (default ``<workdir>/export``):

  variables/          Orbax checkpoint of the student's {'params', 'batch_stats'} (no teacher,
                      discriminator or optimiser states: about 1/6 of a training checkpoint)
  config.json         the full training config (model size, input shape, label layout, ...)
  preprocessing.json  what a new patient needs before the network: input shape, intensity
                      normalisation, voxel spacing, channel order, and the label convention
                      of the training cases (``label_convention``: what predict writes)
  evaluation.json     the run's 15-subset test evaluation (Dice / HD95 per subset and region,
                      split, number of cases), when the run was evaluated: what predict
                      reports as the expected accuracy for a patient's modalities
  manifest.json       what this folder is and where it came from (workdir, step)

``python -m mstkd_jax.main --mode=eval --checkpoint=<export folder>`` and
``python -m mstkd_jax.predict --checkpoint <export folder>`` accept it.
"""

import json
import os

from absl import logging
import jax

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import model_facts
from mstkd_jax.data import layouts, pipeline
from mstkd_jax.disk import folder_bytes
from mstkd_jax.fileio import write_json_atomic
from mstkd_jax.modalities import MODALITIES, MODALITY_KEYS

def preprocessing_settings(config):
  """The preprocessing a new patient needs, as a JSON-ready dict."""
  settings = pipeline.settings(config).as_dict()
  settings.update(channels=list(MODALITIES), channel_keys=list(MODALITY_KEYS),
                  layout=config.data.layout, missing_modality='zero channel')
  return settings


def output_folder(workdir, out=None):
  """Where an export of ``workdir`` goes: ``out``, default ``<workdir>/export``."""
  return os.path.abspath(out or os.path.join(workdir, 'export'))


def is_complete(out):
  """True when ``out`` holds a complete export: its manifest, written last, names the step."""
  try:
    with open(os.path.join(out, ckpt.EXPORT_MANIFEST)) as f:
      return 'step' in json.load(f)
  except (OSError, ValueError, TypeError):
    return False


def export_student(config, workdir, checkpoint=None, out=None, overwrite=False):
  """Writes the student of ``workdir``'s checkpoint (None/'latest', 'best' or a step) to
  ``out`` (default ``<workdir>/export``); a complete export there is replaced only with
  ``overwrite``, an incomplete one (an interrupted export) always. The manifest is written
  last: an export without it is incomplete (``is_complete``). Returns the folder."""
  out = output_folder(workdir, out)
  if is_complete(out) and not overwrite:
    raise FileExistsError(f'{out} already holds an export; pass --overwrite to replace it')
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{workdir} has no checkpoints/ folder: nothing to export')
  manager = ckpt.make_manager(directory, read_only=True)
  try:
    step = ckpt.resolve_step(manager, checkpoint)
  finally:
    manager.close()
  variables = ckpt.load_networks(config, workdir, str(step), ('student',)).networks['student']
  source = f'{os.path.abspath(workdir)} step {step}'
  if jax.process_index() == 0 and os.path.exists(os.path.join(out, ckpt.EXPORT_MANIFEST)):
    os.remove(os.path.join(out, ckpt.EXPORT_MANIFEST))   # incomplete until written again
  ckpt.save_network(out, variables, config, network='student', source=source, overwrite=True)
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(out, 'preprocessing.json'), preprocessing_settings(config),
                      indent=2)
    convention, evaluation = model_facts.write_into_export(out, config, workdir)
    if convention in (None, layouts.MIXED):
      print(f'Note: the label convention of this model is {convention or "not recorded"}; '
            'prediction with it needs --labels brats2021 or brats2024.', flush=True)
    if evaluation and evaluation.get('source') != f'step {step}':
      print(f'Note: evaluation.json holds the evaluation of {evaluation.get("source")}, not of '
            f'the exported step {step} (run --mode=eval with this checkpoint to replace it).',
            flush=True)
    write_json_atomic(os.path.join(out, 'metadata.json'), metadata(config, workdir, step),
                      indent=2)
    manifest_path = os.path.join(out, ckpt.EXPORT_MANIFEST)
    with open(manifest_path) as f:
      manifest = json.load(f)
    manifest.update(workdir=os.path.abspath(workdir), step=int(step),
                    which=checkpoint or 'latest')
    write_json_atomic(manifest_path, manifest, indent=2)
  size = folder_bytes(out)
  train_size = folder_bytes(os.path.join(directory, str(step)))
  logging.info('exported the student of %s to %s: %.1f MB (training checkpoint %.1f MB)',
               source, out, size / 1e6, train_size / 1e6)
  print(f'Exported the student ({source}) to {out}: {size / 1e6:.1f} MB, the training '
        f'checkpoint is {train_size / 1e6:.1f} MB.', flush=True)
  return out


def metadata(config, workdir, step):
  """What the exported network is, in the spirit of a MONAI bundle's metadata.json."""
  loss_cfg = config.loss
  distilled = bool(loss_cfg.lambda_mstkd or loss_cfg.lambda_logit or loss_cfg.lambda_gsme
                   or loss_cfg.content_weight)
  try:
    from importlib.metadata import version
    package_version = version('mstkd-jax')
  except Exception:  # pylint: disable=broad-except
    package_version = 'unknown (not installed as a package)'
  return {
      'name': 'MST-KDNet student' if distilled else 'student trained without distillation',
      'method': 'MST-KDNet (Zhu, Chen et al., MICCAI 2025), JAX/Flax implementation mstkd-jax',
      'version': package_version,
      'task': '3D brain tumour segmentation (WT, TC, ET) from any subset of FLAIR, T1, T1Gd, T2',
      'inputs': {'channels': list(MODALITIES), 'file_keys': list(MODALITY_KEYS),
                 'missing_modality': 'a channel of zeros',
                 'input_shape': list(config.data.input_shape),
                 'spacing_mm': config.data.spacing, 'normalization': config.data.normalization},
      'outputs': {'channels': ['NETC/NCR', 'SNFH/ED', 'ET', 'background'],
                  'activation': 'independent sigmoids', 'threshold': 0.5,
                  'label_conventions': {'brats2024': {'NETC': 1, 'SNFH': 2, 'ET': 3},
                                        'brats2021': {'NCR': 1, 'ED': 2, 'ET': 4}}},
      'training': {'workdir': os.path.abspath(workdir), 'step': int(step),
                   'data_root': str(config.data.root or 'synthetic cases'),
                   'epochs': int(config.train.epochs)},
      'intended_use': 'research only; not a medical device, not for clinical decisions',
      'license': 'set by the owner of the training data and weights (fill in before sharing)',
  }
