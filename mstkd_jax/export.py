"""``--mode=export``: the trained networks and what prediction needs, for evaluation and
prediction.

    python -m mstkd_jax.main --config=configs/brats.py --workdir=runs/brats --mode=export \
        [--checkpoint=best] [--out=runs/brats/student]

writes (default ``<workdir>/export``):

  variables/          Orbax checkpoint of the student's {'params', 'batch_stats'} (no
                      discriminator or optimiser states)
  teacher_variables/  the teacher's, unless --export_teacher=false (prediction uses it for a
                      patient with all four scans when the policy below says so)
  config.json         the full training config (model size, input shape, label layout, ...)
  preprocessing.json  what a new patient needs before the network: input shape, intensity
                      normalisation, voxel spacing, channel order, and the label convention
                      of the training cases (``label_convention``: what predict writes)
  evaluation.json     the run's 15-subset test evaluation (Dice / HD95 per subset and region,
                      split, number of cases), when the run was evaluated: what predict
                      reports as the expected accuracy for a patient's modalities
  prediction_policy.json  which network and scans prediction uses for each input, decided
                      from the run's test evaluation, with the evidence (prediction_policy.py)
  metadata.json       the networks it holds and each one's evaluation, the policy in short
  manifest.json       what this folder is and where it came from (workdir, step)

``python -m mstkd_jax.main --mode=eval --checkpoint=<export folder>`` and
``python -m mstkd_jax.predict --checkpoint <export folder>`` accept it.
"""

import json
import os
import shutil

from absl import logging
import jax

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import model_facts
from mstkd_jax import prediction_policy
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


def export_student(config, workdir, checkpoint=None, out=None, overwrite=False, teacher=True,
                   choose_scans=False):
  """Writes the student of ``workdir``'s checkpoint (None/'latest', 'best' or a step) to
  ``out`` (default ``<workdir>/export``), with the teacher unless ``teacher`` is False, and
  the prediction policy decided from the run's test evaluation (with a per-region choice of
  scans only with ``choose_scans``); a complete export there is
  replaced only with ``overwrite``, an incomplete one (an interrupted export) always. The
  manifest is written last: an export without it is incomplete (``is_complete``). Returns the
  folder."""
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
  networks = ckpt.load_networks(config, workdir, str(step),
                                 ('student', 'teacher') if teacher else ('student',)).networks
  source = f'{os.path.abspath(workdir)} step {step}'
  if jax.process_index() == 0 and os.path.exists(os.path.join(out, ckpt.EXPORT_MANIFEST)):
    os.remove(os.path.join(out, ckpt.EXPORT_MANIFEST))   # incomplete until written again
  ckpt.save_network(out, networks['student'], config, network='student', source=source,
                    overwrite=True)
  if teacher:
    ckpt.add_network(out, 'teacher', networks['teacher'])
  elif jax.process_index() == 0:     # a teacher of an export this one replaces
    shutil.rmtree(os.path.join(out, 'teacher_variables'), ignore_errors=True)
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
    policy = prediction_policy.from_workdir(workdir, teacher, choose_scans)
    prediction_policy.write(policy, out)
    write_json_atomic(os.path.join(out, 'metadata.json'),
                      metadata(config, workdir, step, evaluation, policy, teacher), indent=2)
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


def network_summaries(evaluation, teacher):
  """{network: what it is and how it scored on the held-out evaluation} for metadata.json."""
  evaluation = evaluation or {}
  full = (evaluation.get('subsets') or {}).get('FLAIR+T1+T1Gd+T2')
  out = {'student': {'folder': 'variables', 'inputs': 'any non-empty subset of the four scans',
                     'evaluation': {'all_four_scans': full,
                                    'mean_over_15_subsets': evaluation.get(
                                        'average_over_subsets')}}}
  if teacher:
    out['teacher'] = {'folder': 'teacher_variables', 'inputs': 'all four scans',
                      'evaluation': {'all_four_scans': evaluation.get('teacher')}}
  return out


def metadata(config, workdir, step, evaluation=None, policy=None, teacher=False):
  """What the exported networks are, in the spirit of a MONAI bundle's metadata.json."""
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
      'networks': network_summaries(evaluation, teacher),
      'evaluated_on': {k: (evaluation or {}).get(k) for k in ('split', 'num_cases', 'data',
                                                              'source')},
      'prediction_policy': {
          'all_four_scans': (policy or {}).get('full_input', {}).get('regions'),
          'per_region_choice_of_scans': bool(
              (policy or {}).get('subset_selection', {}).get('applied')),
          'file': prediction_policy.FILE_NAME},
      'training': {'workdir': os.path.abspath(workdir), 'step': int(step),
                   'data_root': str(config.data.root or 'synthetic cases'),
                   'epochs': int(config.train.epochs)},
      'intended_use': 'research only; not a medical device, not for clinical decisions',
      'license': 'set by the owner of the training data and weights (fill in before sharing)',
  }
