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
NIfTI image or not named as a channel file, a NIfTI file in a case folder that is none of its
scans), and any skipped entry or failed case makes the exit status 1. Output files are named
``<case id>.nii.gz``, the names BraTS submissions expect (BraTS-GLI-00001-000.nii.gz,
BraTS2021_00001.nii.gz). ``--continue`` skips the cases already done, those whose label map and
sidecar JSON both exist (a restarted job carries on). One output folder holds one label
convention: adding labels of another convention to a folder's segmentations is refused.

``--checkpoint`` is an exported student (``--mode=export``) or a training workdir (then
``--step latest|best|N`` picks the checkpoint). The preprocessing (intensity scaling, voxel
spacing, the box around the brain) comes from the checkpoint's config, so no config is needed;
``--config`` only checks that the checkpoint is the one expected.

What comes out:

* the segmentation has the input's exact shape, affine and header (data type uint8); voxels
  outside the box the model saw are background;
* the network, printed and in the sidecar: with all four scans, per region, the teacher where
  the export carries it and its held-out Dice was at least the student's (the model's
  ``prediction_policy.json``), else the student on every scan given; ``--network student``
  runs the student alone, as the paper evaluates it;
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
  modalities at hand (when the export carries that evaluation), with what that evaluation was
  computed on (data, split, number of cases) and a warning when it used synthetic cases or
  fewer than 10. Folder mode also writes ``volumes.csv``, one row per case;
* where the brain box is larger than the model's input, overlapping windows (``--overlap``,
  default 0.5) are blended with Gaussian weights (``--blend uniform`` for plain averaging);
* ``--tta``: test-time mirroring, the mean of the predictions for the 8 mirrorings of the input
  (each mirrored back; 8 network passes: about 6x a full-size case's time on a CPU), and
  ``<out>_uncertainty.nii.gz``, the share of the 8 whose thresholded channels differ from the
  result at each voxel (values k/8; 0 = all agree; brought back to the input grid by nearest
  neighbour, so the shares stay exact);
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

Errors are reported in one line (exit status 2): no modality given, a modality given twice or
one file given as two modalities, a missing or unreadable file, a file that looks like a label
map or mask rather than a scan, files of different shapes or affines, a checkpoint trained with
another config, an unknown label convention, an output location that cannot be written (checked
before any work), an output folder another prediction is writing into (one job per folder: a
lock file ``<out>/.mstkd.lock`` names the holder). An output that cannot be written once the
work started (a full disk) stops the run with one line naming the file and the free space, exit
status 4; no temporary file is left behind, and ``--continue`` carries on after space is freed.
"""

import contextlib
import os
import sys
import time

from absl import flags, logging

from mstkd_jax import cli
from mstkd_jax import compile_cache
from mstkd_jax import configs
from mstkd_jax import disk
from mstkd_jax import model_facts
from mstkd_jax import workdir_lock
from mstkd_jax.inference import load_model
from mstkd_jax.modalities import LEGACY_KEYS, MODALITIES, MODALITY_KEYS, channel_index
from mstkd_jax.predict.cases import case_id_from_files, check_paths, paths_only, scan_input_folder
from mstkd_jax.predict.errors import OutputWriteError, PredictionError, write_error
from mstkd_jax.predict.labels import LABEL_CHOICES, resolve_labels
from mstkd_jax.predict.outputs import check_out
from mstkd_jax.predict.segment import predict_files, predict_folder, write_case

# Command-line names of each channel (FLAIR, T1, T1Gd, T2): BraTS 2024 first, then 2021.
CHANNEL_OPTIONS = tuple(zip(MODALITY_KEYS, LEGACY_KEYS))
DEFAULT_CHANNELS = ','.join(MODALITIES)


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
  flags.DEFINE_enum('network', 'auto', ('auto', 'student', 'teacher'), 'Which network: auto '
                    "(the model's prediction policy: with all four scans, per region the teacher "
                    'where it scored at least as well as the student on held-out cases; else '
                    'the student on every scan given), student (the student on every scan '
                    'given: the paper\'s protocol), teacher (all four scans only).',
                    flag_values=fv)
  flags.DEFINE_integer('batch_size', None, 'Windows per forward pass.', flag_values=fv)
  flags.DEFINE_string('config', None, 'Optional configs/X.py[:variant] the checkpoint must be '
                      'compatible with.', flag_values=fv)


_define_flags(COMMAND.flags)


def modality_flags(argv):
  """[(flag name, value)] of the modality flags in ``argv`` (--t2f / --flair ...), in order,
  in both spellings --name=value and --name value."""
  names = {n for pair in CHANNEL_OPTIONS for n in pair}
  found = []
  for i, token in enumerate(argv):
    if not token.startswith('-'):
      continue
    name, sep, value = token.lstrip('-').partition('=')
    name = name.lower().replace('-', '_')
    if name in names:
      found.append((name, value if sep else (argv[i + 1] if i + 1 < len(argv) else '')))
  return found


def check_each_modality_once(argv):
  """A modality given by two flags (--flair A --t2f B, or --flair twice) is refused: absl
  would silently keep the last one."""
  seen = {}
  for name, value in modality_flags(argv):
    modality = MODALITIES[channel_index(name)]
    if modality in seen:
      first, before = seen[modality]
      raise PredictionError(f'{modality} is given twice (--{first} {before} and --{name} '
                            f'{value}): give each modality once')
    seen[modality] = (name, value)


def _print_expected(model, record):
  expected = record.get('expected_accuracy')
  subset = record['modalities_used']
  network = record.get('network') or {}
  if network:
    print(f'  network with {subset}: {network["name"]}, {network["reason"]}')
  if expected:
    dice = expected['dice']
    print(f'  expected accuracy with {subset}: Dice WT / TC / ET '
          f'{100 * dice.get("WT", float("nan")):.1f} / {100 * dice.get("TC", float("nan")):.1f}'
          f' / {100 * dice.get("ET", float("nan")):.1f} % on {expected["num_cases"]} '
          f'{expected["split"]} case(s) of this model\'s evaluation ({expected["evaluated"]}, '
          f'{expected.get("data", "unrecorded data")})')
    if expected.get('caveat'):
      print(f'  warning: the expected accuracy was {expected["caveat"]}', file=sys.stderr)
  else:
    print(f'  expected accuracy with {subset}: '
          + model_facts.describe_expected(model.facts, subset))


def main(argv=None):
  """Runs the command on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  compile_cache.enable()
  args = COMMAND.parse_flags_only(argv)
  logging.set_verbosity(logging.WARNING)
  options = {names[0]: getattr(args, names[0]) for names in CHANNEL_OPTIONS}
  raw = sys.argv[1:] if argv is None else list(argv)
  used = [name for name, _ in modality_flags(raw)]
  with contextlib.ExitStack() as held:
    try:
      check_each_modality_once(raw)
      if args.input_dir and any(options.values()):
        raise PredictionError('give either modality files or --input_dir, not both')
      if not args.input_dir:
        check_paths(options)
      check_out(args.out, folder=bool(args.input_dir))
      if args.input_dir:         # one job per output folder
        try:
          held.enter_context(workdir_lock.hold(args.out, 'prediction'))
        except OSError as e:
          if not disk.is_full(e):
            raise
          raise write_error(e, workdir_lock.lock_path(args.out)) from e
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
                    tta=args.tta, resample_to=args.resample_to, network=args.network)
      if args.input_dir:
        choice = resolve_labels(args.labels, model, paths_only(scan.cases))
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
      written, record = write_case(prediction, model, case_id, args.out, args.save_probabilities,
                                   args.report, args.threshold)
    except OutputWriteError as e:
      print(f'error: {e}' + (' (the cases written before it are complete: free space and run '
                             'the same command with --continue)' if args.input_dir else ''),
            file=sys.stderr)
      return 4
    except (PredictionError, FileNotFoundError, cli.InputError) as e:
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
