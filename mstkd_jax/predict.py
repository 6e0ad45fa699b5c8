r"""Segment new patients with a trained student: NIfTI in, NIfTI out in the input's geometry.

One patient (any non-empty subset of the four modalities; the BraTS 2021 names are aliases)::

    python -m mstkd_jax.predict --checkpoint runs/brats/export \
        --t2f BraTS-GLI-00005-100-t2f.nii.gz --t1c BraTS-GLI-00005-100-t1c.nii.gz \
        --out seg.nii.gz [--save_probabilities] [--labels brats2024|brats2021]

Every case under a folder::

    python -m mstkd_jax.predict --checkpoint runs/brats/export --input_dir /data/new \
        --out /data/new-segs [--continue]     # writes /data/new-segs/<case id>.nii.gz

The folder holds either BraTS case folders (BraTS 2024 or 2021 file names; missing modalities
are simply absent, ``seg`` files are ignored) or, as nnU-Net expects, flat files
``CASE_0000.nii.gz`` .. ``CASE_0003.nii.gz``, one per channel number. The channel order of
flat files comes from ``--channels`` (default FLAIR,T1,T1Gd,T2), else from ``--dataset_json``
or a ``dataset.json`` in the folder or its parent (nnU-Net v2 ``channel_names`` or the MSD's
``modality``: e.g. {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}); a channel file that
is absent is a missing modality. Output files are named ``<case id>.nii.gz``, the names BraTS
submissions expect (BraTS-GLI-00001-000.nii.gz, BraTS2021_00001.nii.gz). ``--continue`` skips
cases whose output exists (a restarted job carries on).

``--checkpoint`` is an exported student (``--mode=export``) or a training workdir (then
``--step latest|best|N`` picks the checkpoint). The preprocessing (intensity scaling, voxel
spacing, the box around the brain) comes from the checkpoint's config, so no config is needed;
``--config`` only checks that the checkpoint is the one expected.

What comes out:

* the segmentation has the input's exact shape, affine and header (data type uint8); voxels
  outside the box the model saw are background;
* labels: ``brats2024`` 1 NETC, 2 SNFH, 3 ET; ``brats2021`` (also FeTS, BraTS 2018-2021)
  1 NCR, 2 ED, 4 ET. Default: the checkpoint config's data layout, or when that is 'auto', the
  convention the input file names follow (``_flair``/``_t1ce``: brats2021; ``-t2f``/``-t1c``:
  brats2024), else the option names used (--flair... or --t2f...);
* each voxel gets the label of the innermost region it is in: ET if the ET channel is on, else
  NETC/NCR if the core channel is on, else SNFH/ED if the oedema channel is on. The regions nest
  (ET within TC within WT), so WT, TC and ET computed back from the written labels are exactly
  the unions of thresholded channels the metrics use (WT = ch0|ch1|ch2, TC = ch0|ch2, ET = ch2);
* where the brain box is larger than the model's input, overlapping windows (``--overlap``,
  default 0.5) are blended with Gaussian weights (``--blend uniform`` for plain averaging);
* ``--save_probabilities`` also writes the four sigmoid channels (NETC/NCR, SNFH/ED, ET,
  background) as a float32 4D NIfTI in the same geometry (``<out>_probs.nii.gz``); when the
  model works at another voxel size they are resampled trilinearly, and the segmentation is the
  thresholded resampled probabilities.

Errors are reported in one line (exit status 2): no modality given, a missing or unreadable
file, files of different shapes or affines, a checkpoint trained with another config.
"""

import dataclasses
import importlib.util
import json
import os
import re
import sys
import time

from absl import flags, logging
import numpy as np

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import cli
from mstkd_jax import compile_cache
from mstkd_jax import evaluate
from mstkd_jax.data import layouts, pipeline
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
  """A loaded network: its config, variables (placed on the devices) and inference."""
  config: object
  variables: dict
  inference: object
  source: str


def load_config_file(spec):
  """``path/to/config.py[:variant]`` -> ConfigDict (as ``--config`` of main.py)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise PredictionError(f'config file {path} not found')
  module_spec = importlib.util.spec_from_file_location('_predict_config', path)
  module = importlib.util.module_from_spec(module_spec)
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


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
  return Model(saved, inference.place(loaded.primary()), inference, loaded.source)


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


def resolve_labels(labels, config, paths, option_names=()):
  """The label convention to write: explicit, the config's layout, the file names, the option
  names, else brats2024."""
  if labels not in LABEL_CHOICES:
    raise PredictionError(f'--labels must be one of {LABEL_CHOICES}, got {labels!r}')
  if labels != 'auto':
    return labels
  layout = str(config.data.get('layout', 'auto') or 'auto')
  if layout != 'auto':
    return layouts.get_layout(layout).name
  by_names = _layout_from_names(paths)
  if by_names:
    return by_names
  names = {str(n).lower() for n in option_names}
  if names and names <= set(LEGACY_KEYS):
    return 'brats2021'
  return 'brats2024'


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
  existing folder where a file is wanted."""
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
  if not os.path.isdir(parent):
    raise PredictionError(f'--out {out}: the folder {parent} does not exist')


def predict_files(model: Model, paths, labels='auto', threshold=0.5, overlap=None, blend=None,
                  case_id='patient', option_names=()) -> Prediction:
  """Segments one patient: ``paths`` maps modality names (FLAIR/t2f/flair, T1/t1n/t1,
  T1Gd/t1c/t1ce, T2/t2w/t2) to NIfTI files, any non-empty subset."""
  given = _check_paths(paths)
  layout = resolve_labels(labels, model.config, given.values(), option_names)
  try:
    image, meta = pipeline.preprocess_patient(given, model.config, case_id=case_id)
  except layouts.BadCaseError as e:
    raise PredictionError('; '.join(str(p) for p in e.problems)) from e
  except ValueError as e:
    raise PredictionError(str(e)) from e
  box_probs = model.inference.predict(model.variables, image[None], overlap=overlap,
                                      blend=blend)[0]
  probs = pipeline.restore_geometry(box_probs, meta, order=1).astype(np.float32)
  # Outside the box the model saw nothing: background with probability 1 there.
  seen = pipeline.restore_geometry(np.ones(box_probs.shape[:3], np.float32), meta, order=1)
  probs[..., 3] += 1.0 - seen
  seg = probs_to_labels(probs, layout, threshold)
  return Prediction(seg, probs, layout, meta, tuple(meta['present']))


def write_prediction(prediction: Prediction, out, save_probabilities=False):
  """Writes the segmentation (and ``<out>_probs.nii.gz``); returns the written paths."""
  pipeline.write_nifti(prediction.labels, prediction.meta, out, dtype=np.uint8)
  written = [out]
  if save_probabilities:
    path = probabilities_path(out)
    pipeline.write_nifti(prediction.probabilities, prediction.meta, path, dtype=np.float32)
    written.append(path)
  return written


def probabilities_path(out):
  for suffix in ('.nii.gz', '.nii'):
    if out.endswith(suffix):
      return out[:-len(suffix)] + '_probs' + suffix
  return out + '_probs.nii.gz'


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


def folder_cases(input_dir, channels=None, dataset_json=None):
  """[(case id, {modality key: path} or a PredictionError)] of every case under
  ``input_dir``: nnU-Net-style flat files, else BraTS case folders."""
  if not os.path.isdir(input_dir):
    raise PredictionError(f'--input_dir {input_dir}: no such folder')
  flat = channel_file_cases(input_dir, channel_order(channels, dataset_json, input_dir))
  if flat:
    return flat
  if channels or dataset_json:
    raise PredictionError(f'--input_dir {input_dir}: no files named CASE_0000.nii.gz '
                          '(--channels and --dataset_json are for nnU-Net-style inputs)')
  try:
    cases = layouts.discover_cases(input_dir, 'auto')
  except layouts.DataError as e:
    raise PredictionError(f'{e} (or nnU-Net-style files CASE_0000.nii.gz .. '
                          'CASE_0003.nii.gz)') from e
  out = []
  for case in cases:
    try:
      out.append((case.case_id, _case_paths(case)))
    except PredictionError as e:
      out.append((case.case_id, e))
  return out


def predict_folder(model, cases, out_dir, labels='auto', save_probabilities=False,
                   skip_existing=False, **kwargs):
  """Segments ``cases`` (from ``folder_cases``) into ``out_dir/<case id>.nii.gz``;
  ``skip_existing``: not the cases whose output exists.
  Returns (written paths, {case id: error message}, skipped case ids)."""
  os.makedirs(out_dir, exist_ok=True)
  written, failed, skipped = [], {}, []
  todo = []
  for case_id, paths in cases:
    out = os.path.join(out_dir, f'{case_id}.nii.gz')
    if skip_existing and os.path.exists(out):
      skipped.append(case_id)
    else:
      todo.append((case_id, paths, out))
  if skipped:
    print(f'--continue: {len(skipped)} case(s) already segmented in {out_dir}, '
          f'{len(todo)} to go', file=sys.stderr, flush=True)
  # A terminal gets a bar; logs (SLURM, pipes) one line per case with its time.
  bar = Progress(len(todo), 'predict', log_lines=False)
  lines = not sys.stderr.isatty()
  for case_id, paths, out in todo:
    started = time.time()
    try:
      if isinstance(paths, PredictionError):
        raise paths
      # With labels='auto' and an 'auto' config layout, the case's file names decide.
      prediction = predict_files(model, paths, labels=labels, case_id=case_id, **kwargs)
      written += write_prediction(prediction, out, save_probabilities)
      if lines:
        print(f'{case_id}: {time.time() - started:.1f} s -> {out}', file=sys.stderr,
              flush=True)
    except PredictionError as e:
      failed[case_id] = str(e)
      logging.error('%s: %s', case_id, e)
    bar.update()
  bar.close()
  return written, failed, skipped


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
  flags.DEFINE_integer('batch_size', None, 'Windows per forward pass.', flag_values=fv)
  flags.DEFINE_string('config', None, 'Optional configs/X.py[:variant] the checkpoint must be '
                      'compatible with.', flag_values=fv)


_define_flags(COMMAND.flags)


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
    cases = (folder_cases(args.input_dir, args.channels, args.dataset_json)
             if args.input_dir else None)
    config = load_config_file(args.config) if args.config else None
    t0 = time.time()
    print(f'loading the network from {args.checkpoint} (the first forward pass compiles it)',
          file=sys.stderr, flush=True)
    model = load_model(args.checkpoint, args.step, config, args.batch_size)
    kwargs = dict(threshold=args.threshold, overlap=args.overlap, blend=args.blend)
    if args.input_dir:
      written, failed, skipped = predict_folder(
          model, cases, args.out, args.labels, args.save_probabilities,
          skip_existing=args['continue'].value, **kwargs)
      print(f'{len(written)} file(s) written to {args.out} in {time.time() - t0:.1f} s'
            + (f' ({len(skipped)} case(s) already done, skipped)' if skipped else ''))
      if failed:
        for case_id, message in failed.items():
          print(f'error: {case_id}: {message}', file=sys.stderr)
        return 1
      return 0
    prediction = predict_files(model, options, labels=args.labels, option_names=used,
                               **kwargs)
    written = write_prediction(prediction, args.out, args.save_probabilities)
  except (PredictionError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except ValueError as e:  # config compatibility and other checks
    print(f'error: {e}', file=sys.stderr)
    return 2
  counts = {int(v): int(n) for v, n in zip(*np.unique(prediction.labels, return_counts=True))}
  present = subset_name(prediction.present)
  print(f'{", ".join(written)}: {prediction.layout} labels {counts} from {present} '
        f'({model.source}, {time.time() - t0:.1f} s)')
  return 0


def console_main():
  """The ``mstkd-predict`` command (``pip install .``)."""
  sys.exit(main())


if __name__ == '__main__':
  console_main()
