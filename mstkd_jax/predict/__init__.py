"""Segmenting new patients with a trained network (``python -m mstkd_jax.predict``,
``mstkd-predict``; the command's documentation is ``mstkd_jax.predict.command``'s).

One room per job:

  cases.py     finding and checking a patient's scans (single files, nnU-Net channel files,
               case folders, entries that are no case) and their preprocessing / re-gridding
  labels.py    the label convention of one run and the label map from probabilities
  segment.py   one patient's files, and a folder of cases with --continue
  outputs.py   label map, probabilities, uncertainty, sidecar JSON, volumes.csv, case report
  command.py   the flags and the command (its docstring is the --help text)
  errors.py    PredictionError

The network itself (loading, the compiled forward pass, sliding windows, test-time mirroring)
is ``mstkd_jax.inference``'s. The names below are the public API of prediction.
"""

from mstkd_jax.inference import Model, load_model
from mstkd_jax.predict.cases import FolderScan, case_id_from_files, folder_cases, scan_input_folder
from mstkd_jax.predict.command import console_main, main
from mstkd_jax.predict.errors import PredictionError
from mstkd_jax.predict.labels import LabelChoice, probs_to_labels, resolve_labels
from mstkd_jax.predict.outputs import Prediction, write_prediction
from mstkd_jax.predict.segment import predict_files, predict_folder

__all__ = ['FolderScan', 'LabelChoice', 'Model', 'Prediction', 'PredictionError',
           'case_id_from_files', 'console_main', 'folder_cases', 'load_model', 'main',
           'predict_files', 'predict_folder', 'probs_to_labels', 'resolve_labels',
           'scan_input_folder', 'write_prediction']
