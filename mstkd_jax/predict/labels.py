"""The label convention of one prediction run: which values the written label maps use, and why.

``brats2024``: 1 NETC, 2 SNFH, 3 ET; ``brats2021`` (also FeTS, BraTS 2018-2021): 1 NCR, 2 ED,
4 ET. ``resolve_labels`` picks one convention for the whole run; ``probs_to_labels`` writes
each voxel as the innermost region it is in (ET within TC within WT).
"""

import dataclasses
import os

import numpy as np

from mstkd_jax.data import layouts
from mstkd_jax.modalities import LEGACY_KEYS
from mstkd_jax.predict.errors import PredictionError

LABEL_CHOICES = ('auto', 'brats2024', 'brats2021')


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
