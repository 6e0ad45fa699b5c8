"""What a trained model says about itself beyond its weights, for the people who use it.

Two facts travel from training to prediction:

* the **label convention** the training cases used (``brats2021``: 1 NCR, 2 ED, 4 ET;
  ``brats2024``: 1 NETC, 2 SNFH, 3 ET), recorded by the data pipeline in
  ``<workdir>/label_convention.json`` and written by ``--mode=export`` into the export's
  ``preprocessing.json`` (``label_convention``). Prediction writes that convention unless told
  otherwise, so one model writes one convention whatever the input files are called;
* the **15-subset evaluation** of the run (Dice and HD95 per modality subset and region, the
  split and number of cases it came from), copied from ``<workdir>/eval/summary.json`` into the
  export's ``evaluation.json``. Prediction reports, for the modalities a patient has, how the
  model scored with exactly those.

``read(location, config)`` gives both for an export or a training workdir (``ModelFacts``).
"""

import dataclasses
import json
import os
from typing import Optional

from mstkd_jax.data import layouts, pipeline
from mstkd_jax.fileio import write_json_atomic
from mstkd_jax.metrics import REGIONS

EVALUATION_FILE = 'evaluation.json'
PREPROCESSING_FILE = 'preprocessing.json'
# Where a training workdir keeps the test split's 15-subset evaluation (evaluate.output_dir).
WORKDIR_EVALUATION = os.path.join('eval', 'summary.json')


@dataclasses.dataclass
class ModelFacts:
  label_convention: Optional[str]   # 'brats2021', 'brats2024', 'mixed' or None (not recorded)
  label_source: str                 # how it is known, for messages
  evaluation: Optional[dict]        # see ``evaluation_record``, or None

  def expected(self, subset_name):
    """{region: {'dice', 'hd95', 'num_cases'}} of the evaluation for one subset name
    ('FLAIR+T1Gd'), or None."""
    if not self.evaluation:
      return None
    return self.evaluation['subsets'].get(subset_name)


def training_label_convention(config, workdir):
  """(convention or None, how it is known) of a training run: its recorded convention, else the
  config's layout when it names one, else the synthetic cases' layout when it trained on
  those."""
  record = pipeline.read_label_convention(workdir) if workdir else None
  if record and record.get('convention'):
    counts = ', '.join(f'{n} {k}' for k, n in (record.get('cases') or {}).items())
    return record['convention'], f'the convention of its training cases ({counts})'
  layout = str(config.data.get('layout', 'auto') or 'auto')
  if layout != 'auto':
    return layouts.get_layout(layout).name, f'its training config (data.layout={layout})'
  if not config.data.get('root'):
    return (layouts.get_layout(config.data.synthetic_layout).name,
            'its training config (synthetic cases)')
  return None, 'not recorded by this run (trained before the convention was recorded)'


# Fewer held-out cases than this make an expected accuracy a rough guide only.
FEW_CASES = 10


def evaluation_data(config):
  """What an evaluation of ``config``'s run was computed on: {'root': the data root or None,
  'synthetic': True for the generated cases of a run without a data root}."""
  root = config.data.get('root') if hasattr(config.data, 'get') else None
  return {'root': os.path.abspath(str(root)) if root else None, 'synthetic': not root}


def evaluation_caveat(evaluation, num_cases):
  """A warning when an expected accuracy says little about real scans (it was measured on
  synthetic cases, or on fewer than ``FEW_CASES`` cases), else None."""
  data = (evaluation or {}).get('data') or {}
  if data.get('synthetic'):
    return (f'measured on {num_cases} synthetic case(s), not on real scans: it says nothing '
            'about the accuracy on patients')
  if num_cases < FEW_CASES:
    return (f'measured on only {num_cases} case(s) (fewer than {FEW_CASES}): a rough guide, '
            'the accuracy on other patients can differ widely')
  return None


def evaluation_record(summary):
  """The part of an evaluation summary.json that an export carries: per-subset means, the
  15-subset average, the teacher's means on all four scans, the split, source, data and
  number of cases."""
  keep = ('split', 'source', 'data', 'num_cases', 'hd95_convention', 'subsets',
          'average_over_subsets', 'teacher', 'sliding_window')
  return {k: summary[k] for k in keep if k in summary}


def read_workdir_evaluation(workdir, config=None):
  """The evaluation record of a training workdir's test split (with what it was computed on,
  from ``config`` when the summary predates that field), or None."""
  path = os.path.join(workdir, WORKDIR_EVALUATION)
  try:
    with open(path) as f:
      record = evaluation_record(json.load(f))
  except (OSError, ValueError, KeyError):
    return None
  if 'data' not in record and config is not None:
    record['data'] = evaluation_data(config)
  return record


def write_into_export(out, config, workdir):
  """Adds the facts of ``workdir``'s run to the export folder ``out``: ``label_convention``
  (and its source) into preprocessing.json, the test evaluation as evaluation.json."""
  convention, source = training_label_convention(config, workdir)
  path = os.path.join(out, PREPROCESSING_FILE)
  with open(path) as f:
    settings = json.load(f)
  settings.update(label_convention=convention, label_convention_source=source,
                  config_layout=settings.get('layout'))
  if convention:
    settings['layout'] = convention
  write_json_atomic(path, settings, indent=2)
  evaluation = read_workdir_evaluation(workdir, config)
  target = os.path.join(out, EVALUATION_FILE)
  if evaluation:
    write_json_atomic(target, evaluation, indent=2)
  elif os.path.exists(target):
    os.remove(target)
  return convention, evaluation


def read(location, config) -> ModelFacts:
  """The facts of an export folder (its preprocessing.json and evaluation.json) or of a training
  workdir (its records and eval/summary.json)."""
  settings_path = os.path.join(location, PREPROCESSING_FILE)
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      settings = json.load(f)
    if 'label_convention' in settings:
      convention = settings['label_convention']
      source = settings.get('label_convention_source', 'the export')
    else:
      convention, source = training_label_convention(config, None)
      if convention is None:
        source = 'not recorded in this export (made before the convention was recorded)'
    evaluation = None
    eval_path = os.path.join(location, EVALUATION_FILE)
    if os.path.exists(eval_path):
      with open(eval_path) as f:
        evaluation = json.load(f)
      if 'data' not in evaluation:      # exports made before the field: the training data
        evaluation['data'] = evaluation_data(config)
    return ModelFacts(convention, source, evaluation)
  convention, source = training_label_convention(config, location)
  return ModelFacts(convention, source, read_workdir_evaluation(location, config))


def describe_expected(facts, subset_name):
  """One line: how the model scored with exactly these modalities, or why that is unknown."""
  if not facts.evaluation:
    return 'no evaluation recorded with this model'
  scores = facts.expected(subset_name)
  if not scores:
    return f'no evaluation of {subset_name} recorded with this model'
  parts = ' / '.join(f'{100 * scores[r]["dice"]:.1f}' for r in REGIONS if r in scores)
  cases = max(int(scores[r].get('num_cases', 0)) for r in REGIONS if r in scores)
  split = facts.evaluation.get('split', 'test')
  line = (f'with {subset_name} this model scored Dice WT / TC / ET {parts} % on {cases} '
          f'{split} case(s) of {describe_data(facts.evaluation)} '
          f'({facts.evaluation.get("source", "")})')
  caveat = evaluation_caveat(facts.evaluation, cases)
  return line + (f'; warning: {caveat}' if caveat else '')


def describe_data(evaluation):
  """'synthetic cases', '<data root>' or 'unrecorded data' for messages."""
  data = (evaluation or {}).get('data') or {}
  if data.get('synthetic'):
    return 'synthetic cases'
  return data.get('root') or 'unrecorded data'
