r"""The paper's Figure 2 for one case: the four modalities, the ground truth, and the student's
predictions with all four modalities, FLAIR+T1Gd+T2, FLAIR+T1Gd and FLAIR alone.

    python -m mstkd_jax.visualize --checkpoint runs/brats/export \
        --case /data/BraTS2021/BraTS2021_00000 --out fig.png [--slice Z] [--step best]

``--checkpoint`` is an exported student or a training workdir; ``--case`` a case folder in either
BraTS layout (without a ``seg`` file the ground-truth panel is left empty). The picture shows
the case in the model's space (after the checkpoint's resampling and brain box), on the axial
slice (third voxel axis) with the most tumour in the ground truth (else in the all-modality
prediction), each image rotated by 90 degrees as radiology viewers show BraTS volumes. The
title names the case, the model (checkpoint and step) and the slice both as an index of the
input volume and of the model's grid.

When the case lacks modalities, the prediction panels show the subsets that can be run with
what it has: each of the paper's four subsets reduced to the modalities present, without
repeats, then the largest other subsets of them; the title says which modalities are absent.

Colours (the usual BraTS rendering, nested regions drawn from the outside in):
WT green (its part outside TC: oedema / SNFH), TC yellow (its part outside ET: necrosis / NETC),
ET red. Each prediction panel is titled with the subset and that case's Dice of WT / TC / ET
(over the whole box, in %).
"""

import json
import os
import sys
import time

from absl import flags, logging
import matplotlib
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
import nibabel as nib
import numpy as np

from mstkd_jax import cli, compile_cache, inference as inference_lib
from mstkd_jax import metrics as metrics_lib
from mstkd_jax.data import layouts, pipeline, preprocess
from mstkd_jax.modalities import (ALL_SUBSETS, MODALITIES, MODALITY_KEYS, masked_copies,
                                  parse_subset, subset_name)
from mstkd_jax.models import build

FIGURE_SUBSETS = tuple(parse_subset(s) for s in ('1111', '1011', '1010', '1000'))
# RGBA of the visible part of each region: WT-only (oedema), TC-only (core), ET.
COLOURS = {'WT': (0.10, 0.80, 0.20, 0.55), 'TC': (1.00, 0.85, 0.00, 0.70),
           'ET': (0.90, 0.05, 0.05, 0.80)}


def load_case(case_dir, config):
  """(image box [bx,by,bz,4], label codes box or None, meta, case id) of a case folder."""
  case = layouts.describe_case(os.path.abspath(case_dir), 'auto')
  paths = {key: p for key, p in zip(MODALITY_KEYS, case.images) if p}
  if not paths:
    raise ValueError(f'{case_dir}: no modality file found '
                     f'({"; ".join(str(p) for p in case.problems)})')
  image, meta = pipeline.preprocess_patient(paths, config, case_id=case.case_id)
  codes = None
  if case.seg:
    seg = np.asanyarray(nib.load(case.seg).dataobj)
    if seg.shape != tuple(meta['original_shape']):
      raise ValueError(f'{case.seg}: shape {seg.shape} differs from the images '
                       f'{tuple(meta["original_shape"])}')
    codes = preprocess.to_model_space(layouts.labels_to_codes(seg, case.layout), meta, order=0)
  return image, codes, meta, case.case_id


def _regions_from_codes(codes):
  return layouts.region_masks(codes)


def choose_slice(regions):
  """Axial index (third axis) with the most WT voxels; the middle slice if there are none."""
  counts = regions['WT'].sum(axis=(0, 1))
  return int(np.argmax(counts)) if counts.max() > 0 else regions['WT'].shape[2] // 2


def _overlay(regions, z):
  """RGBA [X, Y, 4] of the nested regions on slice z."""
  shape = regions['WT'].shape[:2]
  rgba = np.zeros(shape + (4,), np.float32)
  for name in ('WT', 'TC', 'ET'):   # outer first: inner regions paint over
    rgba[regions[name][:, :, z]] = COLOURS[name]
  return rgba


def figure_subsets(present):
  """The (up to 4) subsets the prediction panels show for a case with modalities ``present``:
  each of ``FIGURE_SUBSETS`` reduced to what is present, without repeats, then the largest
  other subsets of the present modalities."""
  present = tuple(bool(p) for p in present)
  chosen = []
  for subset in FIGURE_SUBSETS:
    reduced = tuple(a and b for a, b in zip(subset, present))
    if any(reduced) and reduced not in chosen:
      chosen.append(reduced)
  others = [s for s in ALL_SUBSETS[::-1]
            if all(p or not a for a, p in zip(s, present)) and s not in chosen]
  others.sort(key=lambda s: -sum(s))
  return tuple((chosen + others)[:len(FIGURE_SUBSETS)])


def original_slice(meta, z):
  """The index along the third axis of the input volume of the model-grid slice ``z`` (at the
  centre of the box), for titles: the model works on a resampled, cropped grid."""
  box_start = np.asarray(meta['box_start'], np.float64)
  box_size = np.asarray(meta['box_size'], np.float64)
  voxel = box_start + np.array([(box_size[0] - 1) / 2, (box_size[1] - 1) / 2, z])
  world = np.asarray(meta['resampled_affine']) @ np.append(voxel, 1.0)
  original = np.linalg.inv(np.asarray(meta['original_affine'])) @ world
  return int(np.rint(original[2]))


def _panel_label(subset, present):
  name = subset_name(subset)
  if all(subset):
    return 'All four'
  if tuple(subset) == tuple(present) and not all(present):
    return f'{name} (all present)'
  return name


def draw(image, truth, predictions, out, title=None, z=None, meta=None):
  """Writes the figure. image [bx,by,bz,4]; truth: region dict or None; predictions:
  {subset: region dict} in panel order (at most 4); meta: the case's preprocessing record
  (for the slice index of the input volume in the title). Returns the slice drawn."""
  matplotlib.use('Agg')

  present = tuple(bool(image[..., c].any()) for c in range(4))
  full = max(predictions.items(), key=lambda kv: sum(kv[0]))[1]
  if z is None:
    z = choose_slice(truth if truth is not None and truth['WT'].any() else full)
  show = lambda a: np.rot90(a)
  background = image[:, :, z, 0]
  if not background.any():
    background = image[:, :, z].max(axis=-1)
  fig, axes = plt.subplots(2, 5, figsize=(15, 7.4))
  for c in range(4):
    ax = axes[0, c]
    ax.imshow(show(image[:, :, z, c]), cmap='gray', interpolation='nearest')
    ax.set_title(MODALITIES[c] + ('' if image[..., c].any() else ' (absent)'))
  ax = axes[0, 4]
  ax.imshow(show(background), cmap='gray', interpolation='nearest')
  if truth is not None:
    ax.imshow(show(_overlay(truth, z)), interpolation='nearest')
    ax.set_title('Ground truth')
  else:
    ax.set_title('Ground truth (none)')
  panels = list(predictions.items())
  for k in range(len(FIGURE_SUBSETS)):
    ax = axes[1, k]
    if k >= len(panels):
      ax.axis('off')
      continue
    subset, regions = panels[k]
    ax.imshow(show(background), cmap='gray', interpolation='nearest')
    ax.imshow(show(_overlay(regions, z)), interpolation='nearest')
    label = _panel_label(subset, present)
    if truth is not None:
      scores = '/'.join(f"{100 * metrics_lib.dice(regions[r], truth[r]):.0f}"
                        for r in metrics_lib.REGIONS)
      label += f'\nDice WT/TC/ET {scores}'
    ax.set_title(label, fontsize=10)
  ax = axes[1, 4]
  ax.axis('off')
  ax.legend(handles=[Patch(color=COLOURS[r][:3], label=n) for r, n in
                     (('WT', 'WT (oedema / SNFH)'), ('TC', 'TC (core / NETC)'),
                      ('ET', 'ET (enhancing)'))],
            loc='center', frameon=False, fontsize=11)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  where = f'axial slice {z} of the model grid'
  if meta is not None:
    where = f'axial slice {original_slice(meta, z)} of the input volume ({where})'
  absent = [m for m, p in zip(MODALITIES, present) if not p]
  note = (f'\n{", ".join(absent)} absent: only subsets of {subset_name(present)} were run'
          if absent else '')
  fig.suptitle((title or '') + f'  ({where}){note}', fontsize=12)
  fig.tight_layout(h_pad=2.0)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return z


def figure_for_case(config, variables, case_dir, out, inference=None, z=None, title=None):
  """Runs the student on the subsets ``figure_subsets`` chooses for the case's modalities and
  draws the figure."""
  image, codes, meta, case_id = load_case(case_dir, config)
  inference = inference or inference_lib.get_inference(config)
  variables = inference.place(variables)
  subsets = figure_subsets(meta['present'])
  probs = inference.predict(variables, masked_copies(image, subsets))
  predictions = {s: metrics_lib.region_masks(p) for s, p in zip(subsets, probs)}
  truth = _regions_from_codes(codes) if codes is not None else None
  draw(image, truth, predictions, out, title=title or case_id, z=z, meta=meta)
  return out


def model_label(model):
  """'<export folder> (export of <workdir> step N)' or '<workdir> step N', for titles."""
  location = getattr(model, 'location', '') or ''
  name = os.path.basename(os.path.normpath(location)) if location else 'model'
  manifest = os.path.join(location, 'manifest.json')
  if os.path.exists(manifest):
    try:
      with open(manifest) as f:
        info = json.load(f)
      if 'step' in info:
        return (f'{name} (export of {os.path.basename(str(info.get("workdir", "")))}, '
                f'step {info["step"]})')
    except (OSError, ValueError):
      pass
  return f'{name}, {model.source}'



def figure_after_training(config, dataset, state, out=None):
  """The figure for the first test case of a training run (``config.eval.figure``)."""
  split = dataset.split
  ids = sorted(split['test']) or sorted(split['val']) or sorted(split['train'])
  case = {c.case_id: c for c in dataset.cases}[ids[0]]
  out = out or os.path.join(dataset.workdir, 'figure.png')
  figure_for_case(config, build.network_variables(state, 'student'), case.folder, out,
                  title=f'{case.case_id} (test case), student at step {int(state.step)}')
  logging.info('figure written to %s', out)
  print(f'Figure: {out}', flush=True)
  return out


CURVES = (('val_dice', 'student, 15 subsets', '-'), ('val_teacher_dice', 'teacher, all four',
                                                      '--'))


def moving_average(values, window):
  """The trailing mean of the last ``window`` values at each point (fewer at the start; NaNs
  left out), so a noisy batch-1 loss shows its trend."""
  values = np.asarray(values, float)
  known = ~np.isnan(values)
  sums = np.cumsum(np.concatenate([[0.0], np.where(known, values, 0.0)]))
  counts = np.cumsum(np.concatenate([[0], known]))
  idx = np.arange(1, len(values) + 1)
  start = np.maximum(idx - window, 0)
  n = counts[idx] - counts[start]
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(n > 0, (sums[idx] - sums[start]) / n, np.nan)


def learning_curves(workdir, out=None):
  """``<workdir>/curves.png``: the training loss (as logged, faint, and its moving average)
  and the validation Dice of student and teacher against the step, from ``metrics.jsonl``
  (None when it holds no step yet)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip().endswith('}')]
  records = [r for r in records if not r.get('replayed')]
  if not records:
    return None
  matplotlib.use('Agg')
  fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
  logged = [r for r in records if 'total' in r]
  steps = [r['step'] for r in logged]
  window = max(1, len(logged) // 20)
  for key, label, colour in (('total', 'total loss', 'C0'),
                             ('dice', 'Dice loss (teacher + student)', 'C1')):
    values = [r.get(key, float('nan')) for r in logged]
    ax_loss.plot(steps, values, color=colour, alpha=0.25, lw=0.8)
    ax_loss.plot(steps, moving_average(values, window), color=colour,
                 label=f'{label}, mean of {window} logs' if window > 1 else label)
  ax_loss.set_xlabel('step')
  ax_loss.set_yscale('log')
  ax_loss.legend()
  for key, label, style in CURVES:
    points = [(r['step'], r[key]) for r in records if key in r]
    if points:
      ax_dice.plot(*zip(*points), style, marker='o', label=label)
  ax_dice.set_xlabel('step')
  ax_dice.set_ylabel('validation Dice (mean of WT, TC, ET)')
  ax_dice.set_ylim(0, 1)
  ax_dice.legend()
  fig.tight_layout()
  out = out or os.path.join(workdir, 'curves.png')
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


# ----------------------------------------------------------------------------------------------
# One-page case report of a prediction (predict --report)

# Which scan to show under the overlay, in order of preference: T1Gd shows the enhancing rim.
REPORT_BACKGROUND = ('T1Gd', 'FLAIR', 'T2', 'T1')


def _canonical(data, affine):
  """``data`` and its voxel sizes reoriented to the closest RAS+ axes, so that the three views
  come out as axial, coronal and sagittal whatever the file's orientation."""
  img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), affine))
  return np.asarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])


def tumour_centre(regions):
  """Voxel index (x, y, z) through the lesion's core: the tumour-core voxel nearest to the
  core's centre of mass (ET lies within TC), else the same for the whole tumour, else the
  volume's centre. A voxel of the region itself, so that every view cuts through it."""
  for region in ('TC', 'WT'):
    voxels = np.argwhere(regions[region])
    if len(voxels):
      centre = voxels.mean(axis=0)
      return tuple(int(v) for v in voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))])
  return tuple(n // 2 for n in regions['WT'].shape)


# The regions' colours name the part of the region outside the next inner one, in each label
# convention (brats2021: 1 NCR, 2 ED, 4 ET; brats2024: 1 NETC, 2 SNFH, 3 ET).
_LEGEND_NAMES = {'brats2021': (('WT', 'ED: oedema (WT outside TC)'),
                               ('TC', 'NCR: necrotic core (TC outside ET)'),
                               ('ET', 'ET: enhancing tumour')),
                 'brats2024': (('WT', 'SNFH: oedema (WT outside TC)'),
                               ('TC', 'NETC: non-enhancing core (TC outside ET)'),
                               ('ET', 'ET: enhancing tumour'))}
# The patient's side at each edge of a view (``report_views``: np.rot90 of an RAS+ slice puts
# the first axis left to right and the second bottom to top): (left, right, top, bottom).
VIEW_SIDES = {'Axial': ('L', 'R', 'A', 'P'), 'Coronal': ('L', 'R', 'S', 'I'),
              'Sagittal': ('P', 'A', 'S', 'I')}


def report_views(volume, centre):
  """{view name: 2D array as drawn} of an RAS+ ``volume`` through voxel ``centre``: axial,
  coronal and sagittal slices, each rotated so that its sides are ``VIEW_SIDES``."""
  x, y, z = centre
  return {'Axial': np.rot90(volume[:, :, z]), 'Coronal': np.rot90(volume[:, y, :]),
          'Sagittal': np.rot90(volume[x, :, :])}


def _mark_sides(ax, sides):
  """Orientation letters at the middle of each edge of a panel."""
  left, right, top, bottom = sides
  style = dict(color='white', fontsize=11, fontweight='bold', transform=ax.transAxes,
               bbox=dict(facecolor='black', alpha=0.5, pad=1.5, edgecolor='none'))
  ax.text(0.02, 0.5, left, ha='left', va='center', **style)
  ax.text(0.98, 0.5, right, ha='right', va='center', **style)
  ax.text(0.5, 0.98, top, ha='center', va='top', **style)
  ax.text(0.5, 0.02, bottom, ha='center', va='bottom', **style)


def draw_case_report(background_path, labels, layout, record, out, dpi=150):
  """A one-page PNG of one predicted case: axial, coronal and sagittal slices through the
  lesion's core (``tumour_centre``; the scan at ``background_path`` under the predicted
  regions, orientation letters on every panel), then the text (modalities used, the label
  convention, the volumes, the network and its expected accuracy; ``record``: the
  prediction's sidecar, ``predict.outputs.case_record``) with the legend beside it, named in
  the output's label convention."""
  matplotlib.use('Agg')
  img = nib.load(background_path)
  scan, zooms = _canonical(np.asarray(img.dataobj, np.float32), img.affine)
  codes, _ = _canonical(layouts.labels_to_codes(labels, layout), img.affine)
  regions = layouts.region_masks(codes)
  x, y, z = tumour_centre(regions)
  lo, hi = np.percentile(scan[scan > 0], (0.5, 99.5)) if (scan > 0).any() else (0.0, 1.0)
  aspects = {'Axial': zooms[1] / zooms[0], 'Coronal': zooms[2] / zooms[0],
             'Sagittal': zooms[2] / zooms[1]}
  fig = plt.figure(figsize=(17, 5.6))
  grid = fig.add_gridspec(1, 5, width_ratios=(1, 1, 1, 1.05, 0.75))
  overlays = {r: report_views(m, (x, y, z)) for r, m in regions.items()}
  for k, (name, section) in enumerate(report_views(scan, (x, y, z)).items()):
    ax = fig.add_subplot(grid[0, k])
    rgba = np.zeros(section.shape + (4,), np.float32)
    for region in ('WT', 'TC', 'ET'):
      rgba[overlays[region][name]] = COLOURS[region]
    ax.imshow(section, cmap='gray', vmin=lo, vmax=hi, interpolation='nearest',
              aspect=aspects[name])
    ax.imshow(rgba, interpolation='nearest', aspect=aspects[name])
    index = {'Axial': z, 'Coronal': y, 'Sagittal': x}[name]
    ax.set_title(f'{name} (slice {index})', fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    _mark_sides(ax, VIEW_SIDES[name])
  ax = fig.add_subplot(grid[0, 3])
  ax.axis('off')
  ax.text(0.0, 1.0, _report_text(record, os.path.basename(background_path)),
          va='top', ha='left', family='monospace', fontsize=9.5, transform=ax.transAxes)
  ax = fig.add_subplot(grid[0, 4])
  ax.axis('off')
  ax.legend(handles=[Patch(color=COLOURS[r][:3], label=n)
                     for r, n in _LEGEND_NAMES.get(layout, _LEGEND_NAMES['brats2021'])],
            loc='upper left', frameon=False, fontsize=10, title='Predicted regions',
            title_fontsize=10, alignment='left')
  fig.suptitle(f'{record["case_id"]}: predicted tumour regions (letters: the patient\'s '
               'Left / Right, Anterior / Posterior, Superior / Inferior)', fontsize=13)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=dpi)
  plt.close(fig)
  return out


def _report_text(record, background):
  volumes = record['volumes_ml']
  lines = [f'Modalities used: {record["modalities_used"]}']
  if record['modalities_missing']:
    lines.append(f'Missing:         {", ".join(record["modalities_missing"])}')
  lines += ['', 'Tumour volumes (mL)',
            f'  WT {volumes["WT"]:8.2f}   TC {volumes["TC"]:8.2f}   ET {volumes["ET"]:8.2f}']
  labels = [k for k in volumes if k not in ('WT', 'TC', 'ET')]
  lines.append('  ' + '   '.join(f'{k} {volumes[k]:.2f}' for k in labels))
  network = record.get('network') or {}
  if network:
    lines.append(f'Network:         {network["name"]}')
    per_region = network.get('per_region') or {}
    if len(set(per_region.values())) > 1 or any(
        scans != record['modalities_used']
        for scans in (network.get('scans_per_region') or {}).values()):
      for region, net in per_region.items():
        lines.append(f'  {region}: {net}, {network["scans_per_region"][region]}')
  expected = record.get('expected_accuracy')
  lines += ['', f'Expected Dice with {record["modalities_used"]}']
  if expected:
    dice = expected['dice']
    lines.append(f'  WT {100 * dice["WT"]:.1f}  TC {100 * dice["TC"]:.1f}  '
                 f'ET {100 * dice["ET"]:.1f} %')
    lines.append(f'  ({expected["num_cases"]} {expected["split"]} case(s) of the model\'s')
    lines.append(f'   own evaluation, {expected["evaluated"]})')
    if expected.get('caveat'):
      lines.append('  Warning: ' + ('synthetic cases, not real scans'
                                   if 'synthetic' in expected['caveat']
                                   else f'only {expected["num_cases"]} case(s)'))
  else:
    lines.append('  not known: no evaluation recorded')
    lines.append('  with this model')
  convention = record['labels']
  lines += ['', f'Labels: {convention["convention"]} '
                + ', '.join(f'{k}={v}' for k, v in convention['values'].items())]
  if record.get('test_time_mirroring'):
    lines.append('Test-time mirroring: on (8 mirrorings)')
  if record.get('resampled_to_grid_of'):
    lines.append(f'Resampled onto the {record["resampled_to_grid_of"]} grid')
  model = record['model']
  lines += [f'Background: {background}', f'Model: {os.path.basename(model["checkpoint"])}',
            f'  ({model["source"]})'[:60], '', 'Research use only: not a medical device.']
  return '\n'.join(lines)


COMMAND = cli.Command('python -m mstkd_jax.visualize', __doc__)
flags.DEFINE_string('checkpoint', None, 'Exported student folder or training workdir.',
                    required=True, flag_values=COMMAND.flags)
flags.DEFINE_string('step', None, "Training workdir only: 'latest', 'best' or a step.",
                    flag_values=COMMAND.flags)
flags.DEFINE_string('case', None, 'Case folder (BraTS 2024 or 2021 file names).',
                    required=True, flag_values=COMMAND.flags)
flags.DEFINE_string('out', None, 'Output image (.png, .pdf, ...).', required=True,
                    flag_values=COMMAND.flags)
flags.DEFINE_integer('slice', None, 'Axial slice (default: the one with the most tumour).',
                     flag_values=COMMAND.flags)


def main(argv=None):
  """Runs the command on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  compile_cache.enable()
  args = COMMAND.parse_flags_only(argv)
  logging.set_verbosity(logging.WARNING)
  started = time.time()
  try:
    print(f'loading the network from {args.checkpoint}', file=sys.stderr, flush=True)
    model = inference_lib.load_model(args.checkpoint, args.step)
    print(f'segmenting {args.case} from {len(FIGURE_SUBSETS)} modality subsets (the first '
          'forward pass compiles the network, about a minute on a CPU)', file=sys.stderr,
          flush=True)
    case_id = os.path.basename(os.path.normpath(args.case))
    figure_for_case(model.config, model.variables, args.case, args.out,
                    inference=model.inference, z=args.slice,
                    title=f'{case_id}, {model_label(model)}')
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'Figure: {args.out} ({time.time() - started:.0f} s)')
  return 0


def console_main():
  """The ``mstkd-visualize`` command (``pip install .``)."""
  sys.exit(main())


if __name__ == '__main__':
  console_main()
