"""The 15 non-empty subsets of the four MRI modalities.

Channel order everywhere: FLAIR (t2f), T1 (t1n), T1Gd (t1c), T2 (t2w). A subset is a tuple of
four booleans; a missing modality is fed to the network as a channel of zeros.
"""

import itertools

import numpy as np

MODALITIES = ('FLAIR', 'T1', 'T1Gd', 'T2')
# Short names used in file names and the BraTS 2024 naming.
MODALITY_KEYS = ('t2f', 't1n', 't1c', 't2w')

# Ordered like the columns of the paper's Tables 1-2: one modality, then two, three, all four;
# within a size, in channel order.
ALL_SUBSETS = tuple(
    tuple(i in chosen for i in range(4))
    for size in range(1, 5)
    for chosen in itertools.combinations(range(4), size))
assert len(ALL_SUBSETS) == 15


def subset_name(subset):
  """'FLAIR+T1Gd' for (True, False, True, False)."""
  return '+'.join(m for m, present in zip(MODALITIES, subset) if present)


def parse_subset(text):
  """Parses '1010' (one 0/1 per channel) or 'FLAIR+T1Gd' into a boolean 4-tuple."""
  text = text.strip()
  if len(text) == 4 and set(text) <= {'0', '1'}:
    subset = tuple(ch == '1' for ch in text)
  else:
    names = {m.lower(): i for i, m in enumerate(MODALITIES)}
    names.update({k: i for i, k in enumerate(MODALITY_KEYS)})
    names.update({'t1ce': 2, 't1gd': 2, 't1': 1, 't2': 3, 'flair': 0})
    chosen = set()
    for part in text.split('+'):
      key = part.strip().lower()
      if key not in names:
        raise ValueError(f'unknown modality {part!r} in subset {text!r}; use one of '
                         f'{", ".join(MODALITIES)} or a 4-digit 0/1 mask such as 1010')
      chosen.add(names[key])
    subset = tuple(i in chosen for i in range(4))
  if not any(subset):
    raise ValueError(f'subset {text!r} is empty: at least one modality must be present')
  return subset


def subset_masks(subsets=None):
  """(S, 4) float32 array of 0/1 channel masks; default all 15 subsets."""
  subsets = ALL_SUBSETS if not subsets else tuple(subsets)
  return np.asarray(subsets, dtype=np.float32)
