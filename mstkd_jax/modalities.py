"""The four MRI modalities and their subsets: names, parsing, sampling and masking, in one place.

Channel order everywhere: FLAIR (t2f), T1 (t1n), T1Gd (t1c), T2 (t2w). A subset is a tuple of
four booleans; a missing modality is fed to the network as a channel of zeros.

One vocabulary for subsets, wherever they are given (``train.subsets``, ``eval.val_subsets``,
command lines): ``'all'`` (the 15 non-empty subsets), a 4-digit mask such as ``'1010'``, or
modality names joined by ``+`` (``'FLAIR+T1Gd'``, any name of ``ALIASES``); ``'full'`` is
``'1111'``.

To add a modality-dropout scheme, change ``draw_masks`` (the training step calls it with the
step's key) or give ``train.subsets`` (a repeated entry weights it) or
``train.subset_weighting`` ('size': subsets with more modalities drawn more often).
"""

import itertools
from typing import Iterable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

MODALITIES = ('FLAIR', 'T1', 'T1Gd', 'T2')
# BraTS 2023+ file-name keys of the channels (also the command-line options of prediction).
MODALITY_KEYS = ('t2f', 't1n', 't1c', 't2w')
# BraTS 2018-2021 / FeTS file-name keys.
LEGACY_KEYS = ('flair', 't1', 't1ce', 't2')
# Every accepted name of each channel (lower case) -> channel index.
ALIASES = {name.lower(): i for names in (MODALITIES, MODALITY_KEYS, LEGACY_KEYS)
           for i, name in enumerate(names)}
ALIASES.update({'t1gd': 2, 't1w': 1, 't1-gd': 2, 't1c': 2})   # MSD / nnU-Net dataset.json names

Subset = Tuple[bool, bool, bool, bool]

# Ordered like the columns of the paper's Tables 1-2: one modality, then two, three, all four;
# within a size, in channel order.
ALL_SUBSETS = tuple(
    tuple(i in chosen for i in range(4))
    for size in range(1, 5)
    for chosen in itertools.combinations(range(4), size))
assert len(ALL_SUBSETS) == 15
FULL = (True, True, True, True)


def channel_index(name: str) -> int:
  """0-3 for any name of a modality ('FLAIR', 't2f', 'flair', ...), else a ValueError."""
  index = ALIASES.get(str(name).strip().lower())
  if index is None:
    raise ValueError(f'unknown modality name {name!r}; use FLAIR/t2f/flair, T1/t1n/t1, '
                     'T1Gd/t1c/t1ce, T2/t2w/t2')
  return index


def subset_name(subset: Sequence[bool]) -> str:
  """'FLAIR+T1Gd' for (True, False, True, False)."""
  return '+'.join(m for m, present in zip(MODALITIES, subset) if present)


def subset_mask_string(subset: Sequence[bool]) -> str:
  """'1010' for (True, False, True, False)."""
  return ''.join('1' if present else '0' for present in subset)


def parse_subset(text: str) -> Subset:
  """'1010', 'full' or 'FLAIR+T1Gd' (any names of ``ALIASES``) -> a boolean 4-tuple."""
  text = str(text).strip()
  if text.lower() == 'full':
    return FULL
  if len(text) == 4 and set(text) <= {'0', '1'}:
    subset = tuple(ch == '1' for ch in text)
  else:
    chosen = set()
    for part in text.split('+'):
      try:
        chosen.add(channel_index(part))
      except ValueError:
        raise ValueError(f'unknown modality {part!r} in subset {text!r}; use one of '
                         f'{", ".join(MODALITIES)} or a 4-digit 0/1 mask such as 1010') from None
    subset = tuple(i in chosen for i in range(4))
  if not any(subset):
    raise ValueError(f'subset {text!r} is empty: at least one modality must be present')
  return subset


def parse_subsets(spec: Union[None, str, Iterable]) -> Tuple[Subset, ...]:
  """The subsets of a config field or option: None, '', () or 'all' -> all 15; a string of
  comma-separated subsets, or a sequence of subset strings / boolean tuples."""
  if spec is None or (isinstance(spec, str) and spec.strip().lower() in ('', 'all')):
    return ALL_SUBSETS
  if isinstance(spec, str):
    spec = [s for s in spec.split(',') if s.strip()]
  subsets = tuple(parse_subset(s) if isinstance(s, str) else tuple(bool(x) for x in s)
                  for s in spec)
  return subsets or ALL_SUBSETS


def subset_masks(subsets: Optional[Sequence[Subset]] = None) -> np.ndarray:
  """(S, 4) float32 0/1 channel masks; default all 15 subsets."""
  return np.asarray(ALL_SUBSETS if not subsets else tuple(subsets), dtype=np.float32)


SUBSET_WEIGHTINGS = ('uniform', 'size')


def subset_probabilities(masks, weighting: str = 'uniform') -> Optional[np.ndarray]:
  """Sampling probabilities of the rows of ``masks`` (S, 4): None for 'uniform' (1/S each),
  for 'size' p_s = |s| / sum_t |t| with |s| the number of modalities present (over the 15
  subsets: each single modality 1/32, each pair 2/32, each triple 3/32, all four 4/32)."""
  if weighting == 'uniform':
    return None
  if weighting != 'size':
    raise ValueError(f'train.subset_weighting {weighting!r}: use one of {SUBSET_WEIGHTINGS}')
  sizes = np.asarray(masks, np.float64).sum(axis=1)
  return (sizes / sizes.sum()).astype(np.float32)


def draw_masks(rng, batch_size: int, masks, probabilities=None) -> jax.Array:
  """Modality dropout of the training step: one subset per sample among the rows of ``masks``
  (S, 4), uniformly, or with ``probabilities`` (S,) when given. Returns (N, 4) float32."""
  if probabilities is None:
    idx = jax.random.randint(rng, (batch_size,), 0, masks.shape[0])
  else:
    idx = jax.random.choice(rng, masks.shape[0], (batch_size,), p=jnp.asarray(probabilities))
  return jnp.asarray(masks)[idx]


def neighbour_masks(rng, masks) -> Tuple[jax.Array, jax.Array]:
  """For each row of ``masks`` (N, 4), a subset that differs by one modality: the row plus one
  of its absent modalities (uniformly), or, for the full input, minus one of its four.
  Returns (neighbours (N, 4) float32, is_superset (N,) bool: the neighbour has one more)."""
  masks = jnp.asarray(masks, jnp.float32)
  full = jnp.all(masks > 0, axis=1)
  # Candidates to flip: the absent channels, or all four for a full row; pick one uniformly.
  candidates = jnp.where(full[:, None], 1.0, 1.0 - masks)
  noise = jax.random.uniform(rng, masks.shape)
  flip = jax.nn.one_hot(jnp.argmax(jnp.where(candidates > 0, noise, -1.0), axis=1), 4)
  return jnp.abs(masks - flip), ~full


def apply_masks(image, masks):
  """Zeroes the absent modalities (JAX): image (N, H, W, D, 4) * masks (N, 4)."""
  return image * masks[:, None, None, None, :].astype(image.dtype)


def masked_copies(image: np.ndarray, subsets: Sequence[Subset]) -> np.ndarray:
  """(NumPy) [S, ..., 4]: one copy of ``image`` [..., 4] per subset, absent channels zeroed."""
  masks = subset_masks(subsets)
  return image[None] * masks.reshape((len(subsets),) + (1,) * (image.ndim - 1) + (-1,))
