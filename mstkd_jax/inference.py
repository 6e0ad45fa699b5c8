"""Every forward pass outside training: a trained network loaded, compiled once, run on whole
boxes.

* ``load_model(checkpoint, step)``: an exported network or a training workdir's student
  (``checkpoint.load_networks``), placed on the devices with its compiled forward pass and what
  it says about itself (``model_facts``: label convention, 15-subset evaluation);
* ``Inference``: one ``jax.jit`` function ``probs = f(variables, images[B, H, W, D, 4])`` per
  network size, compiled once (``get_inference`` caches it); inputs go through it in batches
  of ``config.eval.batch_size``, the last batch zero-padded so the shape never changes;
  ``run_masked`` runs one image under several modality masks, the masked copies made on the
  devices and the outputs left there (the 15-subset evaluation scores them there);
* sliding windows (``window_starts``) blended with Gaussian or uniform weights
  (``blend_weights``) over boxes larger than the model's input;
* test-time mirroring (``box_probabilities(..., tta=True)``): the mean over the 8 mirrorings.

Used by the 15-subset evaluation, prediction and the figures; imports none of them.
"""

import dataclasses
import functools
import itertools
import json
import math
import os
import time
from typing import Optional

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import compile_cache
from mstkd_jax import model_facts
from mstkd_jax import prediction_policy
from mstkd_jax.modalities import masked_copies
from mstkd_jax.models import build


class ModelLoadError(ValueError):
  """A checkpoint that cannot be loaded, with a message meant for the user."""


def eval_field(config, name, default):
  """config.eval.<name>, or ``default`` for configs saved before the field existed."""
  section = config.get('eval') if hasattr(config, 'get') else None
  if section is None:
    return default
  value = section.get(name, default) if hasattr(section, 'get') else default
  return default if value is None else value


# ----------------------------------------------------------------------------------------------
# One compiled forward pass, batching, sliding windows


def window_starts(box, window, overlap=0.5):
  """Start offsets of overlapping windows covering ``box`` (per axis, evenly spaced).

  Along an axis of size n with window t <= n: k = ceil((n - t) / (t (1 - overlap))) + 1 windows,
  the first at 0 and the last at n - t. Returns a list of 3-tuples.
  """
  if not 0 <= overlap < 1:
    raise ValueError(f'overlap must be in [0, 1), got {overlap}')
  per_axis = []
  for n, t in zip(box, window):
    if n < t:
      raise ValueError(f'box {tuple(box)} is smaller than the window {tuple(window)}')
    if n == t:
      per_axis.append([0])
      continue
    stride = max(1, int(t * (1.0 - overlap)))
    k = int(math.ceil((n - t) / stride)) + 1
    per_axis.append(sorted({int(round(i * (n - t) / (k - 1))) for i in range(k)}))
  return [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]


def blend_weights(window, mode='gaussian'):
  """Per-voxel weights of one window: 'uniform' ones, or 'gaussian' (sigma = 1/8 of the window
  side, peak 1, floored at 1e-3 so that every voxel keeps some weight)."""
  if mode == 'uniform':
    return np.ones(tuple(window), np.float32)
  if mode != 'gaussian':
    raise ValueError(f"blend must be 'gaussian' or 'uniform', got {mode!r}")
  axes = []
  for t in window:
    x = np.arange(t, dtype=np.float64) - (t - 1) / 2.0
    axes.append(np.exp(-0.5 * (x / (t / 8.0)) ** 2))
  w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
  return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def _local_copy(x):
  """A host copy of an array that spans other processes' devices (multi-host): replicated
  arrays are read locally, sharded ones gathered (a collective: every process calls it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return x


class Inference:
  """The compiled evaluation forward pass of one network size, with batching and windows.

  ``run(variables, images)`` maps [n, H, W, D, 4] inputs of the model's input shape to sigmoid
  probabilities [n, H, W, D, C], ``batch_size`` at a time (the last batch zero-padded: one
  compilation for any n). ``predict(variables, images)`` takes [n, bx, by, bz, 4] boxes at least
  as large as the input shape and slides overlapping windows over them. ``variables`` is
  {'params', 'batch_stats'} of one network, put on this process's devices by ``place``.
  """

  def __init__(self, config, batch_size=None):
    self.config = config
    self.window = tuple(int(s) for s in config.data.input_shape)
    self.channels = int(config.model.in_channels)
    devices = jax.local_devices()
    batch_size = int(batch_size or eval_field(config, 'batch_size', 1))
    # A multiple of the local device count, so that the batch splits evenly across them.
    n_dev = len(devices)
    self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    mesh = Mesh(np.asarray(devices), ('data',))
    self._replicated = NamedSharding(mesh, P())
    self._batch_sharding = NamedSharding(mesh, P('data'))
    forward = functools.partial(build.predict_probs, config=config)

    def probs(variables, images):
      with jax.named_scope('evaluate_forward'):
        return forward(variables['params'], variables['batch_stats'], images)

    self._fn = jax.jit(probs, in_shardings=(self._replicated, self._batch_sharding),
                       out_shardings=self._batch_sharding)
    self._masked = jax.jit(_masked_batch, in_shardings=(self._replicated, self._batch_sharding),
                           out_shardings=self._batch_sharding)
    self.compile_seconds = None

  def place(self, variables):
    """{'params', 'batch_stats'} on this process's devices, replicated (idempotent)."""
    variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    return jax.device_put(jax.tree.map(_local_copy, variables), self._replicated)

  def put(self, array):
    """``array`` on this process's devices, replicated (e.g. a case's image: one transfer)."""
    return jax.device_put(array, self._replicated)

  def _forward(self, variables, batch):
    """The compiled forward pass of one batch, its result left on the devices; the first call
    is timed and logged (compiled or loaded from the compilation cache)."""
    if self.compile_seconds is not None:
      return self._fn(variables, batch)
    t0 = time.time()
    with compile_cache.timed('the evaluation forward pass', log=False) as tally:
      out = jax.block_until_ready(self._fn(variables, batch))
    self.compile_seconds = time.time() - t0
    logging.info('the evaluation forward pass (batch %d of %s): %s; ready and run once in '
                 '%.1f s', self.batch_size, self.window, compile_cache.describe(tally),
                 self.compile_seconds)
    return out

  def _call(self, variables, batch):
    return np.asarray(self._forward(variables, batch))

  def run_masked(self, variables, image, masks, reduce=None):
    """The forward passes of one image [H, W, D, 4] (on the host, or ``put`` on the devices)
    under each row of ``masks`` [S, 4] (1 keeps a modality, 0 zeroes it, on the devices: the
    image travels once), ``batch_size`` rows at a time. Returns [(result, rows)] per batch:
    ``reduce(probs)`` (a compiled function of the batch's probabilities [B, H, W, D, C], e.g.
    a scoring program) or the probabilities, left on the devices (asynchronous), and how many
    of its B rows are real (the last batch is padded with zero masks)."""
    masks = np.asarray(masks, np.float32)
    out = []
    for start in range(0, len(masks), self.batch_size):
      rows = masks[start:start + self.batch_size]
      padded = np.zeros((self.batch_size, masks.shape[1]), np.float32)
      padded[:len(rows)] = rows
      probs = self._forward(variables, self._masked(image, padded))
      out.append((probs if reduce is None else reduce(probs), len(rows)))
    return out

  def stream(self, variables, items):
    """Runs (key, image [H, W, D, 4]) items in batches; yields (key, probs [H, W, D, C])."""
    shape = (self.batch_size,) + self.window + (self.channels,)
    keys, batch = [], np.zeros(shape, np.float32)
    for key, image in items:
      batch[len(keys)] = image
      keys.append(key)
      if len(keys) == self.batch_size:
        out = self._call(variables, batch)
        yield from zip(keys, out)
        keys = []
    if keys:
      batch[len(keys):] = 0.0
      out = self._call(variables, batch)
      yield from zip(keys, out[:len(keys)])

  def run(self, variables, images):
    """[n, H, W, D, 4] (the input shape) -> [n, H, W, D, C] probabilities."""
    images = np.asarray(images, np.float32)
    if tuple(images.shape[1:4]) != self.window:
      raise ValueError(f'inputs of shape {images.shape[1:4]}; the model takes {self.window}')
    out = None
    for i, probs in self.stream(variables, ((i, x) for i, x in enumerate(images))):
      if out is None:
        out = np.empty((len(images),) + probs.shape, np.float32)
      out[i] = probs
    return out

  def predict(self, variables, images, overlap=None, blend=None):
    """[n, bx, by, bz, 4] boxes (each side >= input shape) -> [n, bx, by, bz, C] probabilities,
    from overlapping windows blended with ``blend`` weights (see ``window_starts``)."""
    images = np.asarray(images, np.float32)
    box = tuple(images.shape[1:4])
    if box == self.window:
      return self.run(variables, images)
    overlap = eval_field(self.config, 'overlap', 0.5) if overlap is None else overlap
    blend = eval_field(self.config, 'blend', 'gaussian') if blend is None else blend
    starts = window_starts(box, self.window, overlap)
    weights = blend_weights(self.window, blend)
    total = np.zeros(box, np.float32)
    for s in starts:
      total[tuple(slice(a, a + t) for a, t in zip(s, self.window))] += weights
    out = None

    def items():
      for i in range(len(images)):
        for s in starts:
          sl = tuple(slice(a, a + t) for a, t in zip(s, self.window))
          yield (i, sl), images[i][sl]

    for (i, sl), probs in self.stream(variables, items()):
      if out is None:
        out = np.zeros((len(images),) + box + (probs.shape[-1],), np.float32)
      out[i][sl] += probs * weights[..., None]
    out /= total[None, ..., None]
    return out


def _masked_batch(image, masks):
  """[B, H, W, D, 4]: ``image`` [H, W, D, 4] times each 0/1 row of ``masks`` [B, 4] (the
  arithmetic of ``modalities.masked_copies``)."""
  return image[None] * masks[:, None, None, None, :]


_INFERENCE = {}


def get_inference(config, batch_size=None) -> Inference:
  """The (cached) ``Inference`` of this network size: every evaluation and validation of a run
  reuses one compiled function."""
  key = json.dumps({'model': config.model.to_dict(), 'dtype': str(config.dtype),
                    'shape': list(config.data.input_shape),
                    'batch': batch_size or eval_field(config, 'batch_size', 1)},
                   sort_keys=True, default=str)
  if key not in _INFERENCE:
    _INFERENCE[key] = Inference(config, batch_size)
  return _INFERENCE[key]


# ----------------------------------------------------------------------------------------------
# Test-time mirroring

# The 8 mirrorings of test-time augmentation: every combination of flipping the 3 axes.
MIRRORS = tuple(itertools.product((False, True), repeat=3))


def flip(array, flips):
  """Flips the spatial axes 1-3 of [n, x, y, z, ...] where ``flips`` says so."""
  return array[(slice(None),) + tuple(slice(None, None, -1) if f else slice(None)
                                      for f in flips)]


def box_probabilities(model, image, overlap=None, blend=None, tta=False, passes=None,
                      combine=None):
  """Sigmoid probabilities [bx, by, bz, C] of one preprocessed box [bx, by, bz, 4] from the
  student on the whole box; with ``tta`` the mean over the 8 mirrored inputs (each mirrored
  back), and the per-voxel share of mirrored predictions whose thresholded channels differ
  from the mean's (else None). ``passes`` [(variables, subset or None)] runs each network on
  the box's masked copy for its subset (None: the box as given) and ``combine(outputs [k, bx,
  by, bz, C]) -> [bx, by, bz, C]`` merges them, per mirroring. One ``predict`` call per
  network, for all its mirrorings and copies."""
  passes = list(passes or [(model.variables, None)])
  mirrors = MIRRORS if tta else MIRRORS[:1]
  outputs = [None] * len(passes)
  groups = {}
  for k, (variables, _) in enumerate(passes):
    groups.setdefault(id(variables), []).append(k)
  for members in groups.values():
    inputs = np.stack([image if passes[k][1] is None else masked_copies(image, [passes[k][1]])[0]
                       for k in members])
    batch = np.concatenate([flip(inputs, f) for f in mirrors])
    out = model.inference.predict(passes[members[0]][0], batch, overlap=overlap, blend=blend)
    for j, k in enumerate(members):
      outputs[k] = [flip(out[i * len(members) + j][None], f)[0] for i, f in enumerate(mirrors)]
  merged = [outputs[0][i] if combine is None else combine([o[i] for o in outputs])
            for i in range(len(mirrors))]
  if not tta:
    return merged[0], None
  merged = np.stack(merged)
  mean = merged.mean(axis=0)
  final = mean[..., :3] > 0.5
  disagree = np.mean([np.any((o[..., :3] > 0.5) != final, axis=-1) for o in merged], axis=0)
  return mean, disagree.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# A trained network, loaded


@dataclasses.dataclass
class Model:
  """A loaded model: its config, the student's variables (placed on the devices), inference,
  where it came from, what it says about itself (``model_facts.ModelFacts``: the label
  convention of its training cases, its 15-subset evaluation), the teacher's variables when it
  carries one, and its prediction policy (``prediction_policy``: which network and scans to
  use for a patient's input)."""
  config: object
  variables: dict
  inference: object
  source: str
  facts: model_facts.ModelFacts = None
  location: str = ''
  teacher: Optional[dict] = None
  policy: Optional[dict] = None

  def network(self, name):
    """The placed variables of 'student' or 'teacher'."""
    return self.teacher if name == 'teacher' else self.variables


def load_model(checkpoint, step=None, config=None, batch_size=None) -> Model:
  """An exported student or a training workdir's student (``step``: latest, best or N), read
  by ``checkpoint.load_networks``. ``config`` (optional) must be compatible with the
  checkpoint's own (``checkpoint.check_compatible``); the checkpoint's own is used."""
  if not os.path.isdir(checkpoint):
    raise ModelLoadError(f'checkpoint {checkpoint} is not a folder (an exported student or a '
                         'training workdir)')
  try:
    saved = ckpt.load_config(checkpoint)
  except FileNotFoundError as e:
    raise ModelLoadError(str(e)) from e
  if config is not None:
    ckpt.check_compatible(config, saved, checkpoint)
  if ckpt.is_network_export(checkpoint) and step not in (None, 'latest'):
    raise ModelLoadError(f'{checkpoint} is an exported network: --step does not apply')
  try:
    loaded = ckpt.load_networks(saved, checkpoint, step, names=('student', 'teacher'))
  except FileNotFoundError as e:
    raise ModelLoadError(str(e)) from e
  except (ValueError, KeyError) as e:
    raise ModelLoadError(f'cannot load the network from {checkpoint}: its weights do not fit '
                         f'its config.json (a checkpoint from another config?): {e}') from e
  inference = get_inference(saved, batch_size)
  teacher = loaded.networks.get('teacher')
  try:
    policy = prediction_policy.read(checkpoint, teacher is not None)
  except (OSError, ValueError, KeyError) as e:
    raise ModelLoadError(f'{checkpoint}: cannot read its prediction policy: {e}') from e
  return Model(saved, inference.place(loaded.primary()), inference, loaded.source,
               model_facts.read(checkpoint, saved), os.path.abspath(checkpoint),
               inference.place(teacher) if teacher is not None else None, policy)
