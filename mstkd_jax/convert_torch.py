"""Import of the authors' PyTorch MST-KDNet weights, and export back to PyTorch names.

Command:

  mstkd-convert --state_dict FILE --config=brats --out DIR \
      [--which student|teacher] [--allow_pickle] [--overwrite]

FILE is one of
  * a PyTorch ``state_dict`` of the authors' ``MSTKDNet`` saved with ``torch.save`` (``.pth`` or
    ``.pt``; needs torch, an optional extra: ``pip install torch``);
  * the authors' whole training checkpoint (``model_last.pth`` / ``model_best.pth``: a dict with
    ``model_full`` = teacher and ``model_missing`` = student); ``--which`` picks the network
    (default ``student``);
  * a NumPy ``.npz`` with the same names (``conv1a.weight``, ...), or with every name prefixed
    by ``model_full.`` / ``model_missing.`` for a whole checkpoint; no torch needed.
The names and shapes expected at the default size are those of PyTorch's ``state_dict()``
(454 entries, BatchNorm running statistics included). Every unknown, missing or mis-shaped entry
is reported at once in a :class:`StateDictMismatchError`. The position embedding's length
depends on ``config.data.input_shape`` (120 tokens at 160x192x128): weights trained at another
size need ``--config.data.input_shape=...``. ``.pth`` files are read with
``torch.load(weights_only=True)``; ``--allow_pickle`` lifts that for a file you trust.

Layout rules: conv weight (O, I, kH, kW, kD) -> kernel (kH, kW, kD, I, O);
transposed-conv weight (I, O, k, k, k) -> kernel (k, k, k, O, I) (``layers.Deconv2``, the
layout of Flax's ``ConvTranspose(transpose_kernel=True)``), which is the same axis permutation;
linear weight (out, in) -> kernel (in, out); GroupNorm / LayerNorm / BatchNorm weight -> scale, bias -> bias; BatchNorm
running_mean / running_var -> ``batch_stats`` mean / var; ``num_batches_tracked`` is dropped
(the authors' BatchNorms use a fixed momentum, so it plays no part); the position embedding
(1, T, K) is kept as it is. Module names follow the authors' with rules (see
:func:`torch_name`), e.g. ``Unetr.transformer.layer.3.mlp.w_1.weight`` <->
``params/Unetr/transformer/layer_3/w_1/kernel`` and ``Unetr.decoder9_upsampler.0.block.1.
running_var`` <-> ``batch_stats/Unetr/decoder9_upsampler_0/bn/var``.

Single-network export format (written here, and by the student export of trained checkpoints;
read by evaluation and prediction through ``checkpoint.load_networks``):

  DIR/variables/       Orbax checkpoint (``StandardCheckpointer``) of one network's variables
                       ``{'params': ..., 'batch_stats': ...}``, float32
  DIR/config.json      the config used (``ConfigDict.to_json_best_effort``); its ``model`` and
                       ``data.input_shape`` fields fix the variables' shapes
  DIR/manifest.json    ``{"kind": "network", "network": "student" | "teacher", "source": ...}``

Python API: :func:`load_state_dict_file`, :func:`from_torch_state_dict`,
:func:`to_torch_state_dict`, :func:`convert`; the export
is written by ``checkpoint.save_network`` and read by ``checkpoint.load_networks``.
"""

import os
import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np
from absl import flags, logging

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import cli, compile_cache, configs
from mstkd_jax.models import build

NETWORK_KEYS = {'student': 'model_missing', 'teacher': 'model_full'}
_NBT = 'num_batches_tracked'


class StateDictMismatchError(ckpt.NetworkMismatchError):
  """The state_dict does not fit the network: lists every missing, unknown, mis-shaped entry."""

  def __init__(self, missing=(), unexpected=(), misshaped=(), hint=''):
    super().__init__(missing, unexpected, misshaped, hint,
                     what='the state_dict does not match the network built from the config:')


# ---- names ----

_RULES = (
    # The patch and position embeddings live in the authors' `embeddings` submodule.
    (re.compile(r'^Unetr/transformer/(patch_embeddings|position_embeddings)'),
     r'Unetr/transformer/embeddings/\1'),
    # Our flat layer_i/w_1 is the authors' layer.i.mlp.w_1.
    (re.compile(r'^Unetr/transformer/layer_(\d+)/(w_[12])(?=/|$)'),
     r'Unetr/transformer/layer/\1/mlp/\2'),
    (re.compile(r'^Unetr/transformer/layer_(\d+)(?=/|$)'), r'Unetr/transformer/layer/\1'),
    # nn.Sequential members: decoder3_0 -> decoder3.0, decoder9_upsampler_2 -> ...upsampler.2
    (re.compile(r'^Unetr/(decoder\d+(?:_upsampler|_header)?)_(\d+)(?=/|$)'), r'Unetr/\1/\2'),
)
_DECODER = re.compile(r'^Unetr/decoder[^/]*(?:/\d+)?$')
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
         'var': 'running_var', 'position_embeddings': 'position_embeddings'}


def torch_name(key: Tuple[str, ...], deconv_block: bool = False) -> str:
  """The authors' state_dict name of one of our variables.

  ``key`` = (collection, *modules, leaf), e.g. ('params', 'Unetr', 'decoder9', 'conv',
  'kernel'); ``deconv_block`` says whether the leaf's parent module is a DeconvBlock (has a
  ``deconv`` child), whose conv and bn sit one place later in the authors' Sequential than a
  ConvBlock's.
  """
  if key[-1] not in _LEAF:
    raise KeyError(f'no PyTorch name for {"/".join(key)}')
  is_leaf_module = key[-1] == 'position_embeddings'  # a bare parameter, named like a module
  modules = '/'.join(key[1:] if is_leaf_module else key[1:-1])
  for pattern, repl in _RULES:
    modules = pattern.sub(repl, modules)
  parent, _, last = modules.rpartition('/')
  if _DECODER.match(parent) and last in ('deconv', 'conv', 'bn'):
    # ConvBlock = Sequential(SingleConv(conv), BN); DeconvBlock = Sequential(SingleDeconv,
    # SingleConv, BN); SingleConv/SingleDeconv keep their layer in `.block`.
    role = {'deconv': 'block/0/block',
            'conv': 'block/1/block' if deconv_block else 'block/0/block',
            'bn': 'block/2' if deconv_block else 'block/1'}[last]
    modules = f'{parent}/{role}'
  elif _DECODER.match(modules) and key[-1] in ('kernel', 'bias'):
    modules += '/block'  # a bare SingleConv / SingleDeconv (decoder12_upsampler, ...)
  name = modules if is_leaf_module else f'{modules}/{_LEAF[key[-1]]}'
  return name.replace('/', '.')


def to_torch_layout(x: np.ndarray) -> np.ndarray:
  """Our array -> the authors' layout (kernels transposed; everything else unchanged)."""
  if x.ndim == 5:
    return np.transpose(x, (4, 3, 0, 1, 2))
  if x.ndim == 2:
    return np.transpose(x)
  return x


def from_torch_layout(x: np.ndarray) -> np.ndarray:
  """The authors' array -> our layout: (O, I, kH, kW, kD) -> (kH, kW, kD, I, O) for convs
  (and (I, O, k, k, k) -> (k, k, k, O, I) for transposed convs); (out, in) -> (in, out)."""
  if x.ndim == 5:
    return np.transpose(x, (2, 3, 4, 1, 0))
  if x.ndim == 2:
    return np.transpose(x)
  return x


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat):
  tree = {}
  for key, v in flat.items():
    node = tree
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = v
  return tree


def name_map(variables) -> Dict[Tuple[str, ...], str]:
  """{our key (collection, *modules, leaf): PyTorch name} for every leaf of ``variables``
  (arrays or ShapeDtypeStructs); raises if two leaves would get the same name."""
  flat = _flatten(dict(variables))
  modules = {k[1:-1] for k in flat}
  names = {}
  for key in flat:
    deconv_block = key[1:-2] + ('deconv',) in modules
    names[key] = torch_name(key, deconv_block)
  by_name = {}
  for key, name in names.items():
    by_name.setdefault(name, []).append('/'.join(key))
  clashes = {n: ks for n, ks in by_name.items() if len(ks) > 1}
  if clashes:
    raise ValueError(f'the name rules are not one-to-one: {clashes}')
  return names


def _bn_counters(names: Mapping[Tuple[str, ...], str]):
  """PyTorch names of the BatchNorms' num_batches_tracked buffers."""
  return {name[:-len('running_mean')] + _NBT for key, name in names.items()
          if key[0] == 'batch_stats' and key[-1] == 'mean'}


def expected_torch_shapes(abstract_variables) -> Dict[str, Tuple[int, ...]]:
  """Every name and shape of the authors' state_dict for a network of these variables (the
  BatchNorms' ``num_batches_tracked`` included, shape ())."""
  flat = _flatten(dict(abstract_variables))
  names = name_map(abstract_variables)
  shapes = {}
  for key, name in names.items():
    shape = tuple(flat[key].shape)
    if len(shape) == 5:
      shape = tuple(shape[i] for i in (4, 3, 0, 1, 2))
    elif len(shape) == 2:
      shape = shape[::-1]
    shapes[name] = shape
  shapes.update({n: () for n in _bn_counters(names)})
  return shapes


def from_torch_state_dict(state_dict: Mapping[str, Any], abstract_variables) -> Dict[str, Any]:
  """The authors' state_dict (name -> array) -> our ``{'params', 'batch_stats'}`` (NumPy,
  dtypes of ``abstract_variables``, e.g. from ``models.build.network_struct``).

  Raises :class:`StateDictMismatchError` listing every missing, unknown or mis-shaped entry.
  ``num_batches_tracked`` entries may be absent; they are checked for name only and dropped.
  """
  flat = _flatten(dict(abstract_variables))
  names = name_map(abstract_variables)
  want = expected_torch_shapes(abstract_variables)
  counters = _bn_counters(names)
  given = {k: np.asarray(v) for k, v in state_dict.items()}
  missing = sorted(n for n in want if n not in given and n not in counters)
  unexpected = sorted(n for n in given if n not in want)
  misshaped = sorted((n, given[n].shape, want[n]) for n in given
                     if n in want and given[n].shape != want[n])
  bad_dtype = sorted(n for n in given if n in want and n not in counters
                     and not (np.issubdtype(given[n].dtype, np.floating)
                              or np.issubdtype(given[n].dtype, np.integer)))
  if missing or unexpected or misshaped or bad_dtype:
    hint = []
    if bad_dtype:
      hint.append(f'non-numeric entries: {", ".join(bad_dtype)}.')
    if any(n.endswith('position_embeddings') for n, _, _ in misshaped):
      hint.append('The position embedding has another number of tokens: set '
                  '--config.data.input_shape to the size the weights were trained at.')
    if unexpected and len(missing) == len(want) - len(counters):
      hint.append('No expected name was found: is this a whole training checkpoint or a '
                  'state_dict of another module?')
    raise StateDictMismatchError(missing, unexpected, misshaped, ' '.join(hint))
  out = {}
  for key, name in names.items():
    out[key] = np.ascontiguousarray(from_torch_layout(given[name])).astype(flat[key].dtype)
  return _unflatten(out)


def to_torch_state_dict(variables, num_batches_tracked: int = 0) -> Dict[str, np.ndarray]:
  """Our ``{'params', 'batch_stats'}`` -> the authors' state_dict as NumPy arrays, in PyTorch
  layouts, with a ``num_batches_tracked`` (int64, shape ()) for every BatchNorm, so that
  ``model.load_state_dict({k: torch.from_numpy(v) ...})`` accepts it."""
  flat = _flatten(dict(variables))
  names = name_map(variables)
  out = {name: np.ascontiguousarray(to_torch_layout(np.asarray(flat[key])))
         for key, name in names.items()}
  for n in _bn_counters(names):
    out[n] = np.asarray(num_batches_tracked, np.int64)
  return out


# ---- reading PyTorch / NumPy files ----

def _to_numpy(value):
  if hasattr(value, 'detach'):  # a torch tensor
    import torch  # pylint: disable=g-import-not-at-top
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _torch_load(path, allow_pickle):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'reading {path} needs PyTorch, an optional extra: `pip install torch` (a CPU build is '
        'enough), or save the state_dict as .npz: np.savez(FILE, **{k: v.cpu().numpy() for k, '
        'v in state_dict.items()})') from e
  if allow_pickle:
    return torch.load(path, map_location='cpu', weights_only=False)
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as first:  # pylint: disable=broad-except
    # Training checkpoints may hold NumPy scalars (the validation Dice); allow those types.
    extra = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32))]
    core = getattr(np, '_core', None) or getattr(np, 'core')
    extra.append(core.multiarray.scalar)
    try:
      with torch.serialization.safe_globals(extra):
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # pylint: disable=broad-except
      raise ValueError(
          f'{path} holds objects that torch.load(weights_only=True) refuses; if you trust the '
          f'file, pass --allow_pickle (allow_pickle=True). torch said: {first}') from first


def _pick_network(obj: Mapping[str, Any], which: str, path) -> Mapping[str, Any]:
  """A whole training checkpoint -> the chosen network's state_dict; else ``obj`` itself."""
  if which not in NETWORK_KEYS:
    raise ValueError(f'which must be one of {sorted(NETWORK_KEYS)}, got {which!r}')
  key = NETWORK_KEYS[which]
  nested = [k for k in NETWORK_KEYS.values() if isinstance(obj.get(k), Mapping)]
  if nested:
    if key not in nested:
      raise KeyError(f'{path} is a training checkpoint without {key!r} ({which}); it has '
                     f'{sorted(obj)}')
    return obj[key]
  prefixed = [k for k in NETWORK_KEYS.values()
              if any(n.startswith((k + '.', k + '/')) for n in obj)]
  if prefixed:  # a flattened checkpoint (.npz): model_missing.conv1a.weight, ...
    if key not in prefixed:
      raise KeyError(f'{path} has names prefixed by {prefixed} but none by {key!r} ({which})')
    return {n[len(key) + 1:]: v for n, v in obj.items() if n.startswith((key + '.', key + '/'))}
  if isinstance(obj.get('state_dict'), Mapping):
    return obj['state_dict']
  return obj


def load_state_dict_file(path, which: str = 'student',
                         allow_pickle: bool = False) -> Dict[str, np.ndarray]:
  """Reads a state_dict or a whole training checkpoint (.pth/.pt, or .npz) -> {name: array}.

  ``which`` ('student' = ``model_missing`` | 'teacher' = ``model_full``) picks the network of a
  whole checkpoint. A ``module.`` prefix on every name (DataParallel) is removed.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'--state_dict {path}: no such file')
  if os.path.isdir(path):
    raise IsADirectoryError(f'--state_dict {path} is a folder; give the .pth / .pt / .npz file')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as f:
      obj = {k: f[k] for k in f.files}
  else:
    obj = _torch_load(path, allow_pickle)
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state_dict (a dict of '
                     'tensors); save model.state_dict() rather than the model')
  sd = _pick_network(obj, which, path)
  if sd and all(k.startswith('module.') for k in sd):
    sd = {k[len('module.'):]: v for k, v in sd.items()}
  return {k: _to_numpy(v) for k, v in sd.items()}


def convert(state_dict_path, config, out_dir, which: str = 'student',
            allow_pickle: bool = False, overwrite: bool = False) -> str:
  """Reads FILE, converts it for the network of ``config`` and writes the export to out_dir."""
  state_dict = load_state_dict_file(state_dict_path, which, allow_pickle)
  variables = from_torch_state_dict(state_dict, dict(build.network_struct(config)))
  return ckpt.save_network(out_dir, variables, config, network=which,
                           source=os.path.abspath(os.fspath(state_dict_path)),
                           overwrite=overwrite)


# ---- command line ----

def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  config = cli.config_flag('config')
  compile_cache.enable()
  try:
    out = convert(f.state_dict, config, f.out, which=f.which, allow_pickle=f.allow_pickle,
                  overwrite=f.overwrite)
  except (ValueError, KeyError, OSError, ImportError) as e:
    if cli.show_tracebacks():
      raise
    cli.fail(cli.one_line(e))
  logging.info('wrote the %s network to %s', f.which, out)
  print(f'wrote the {f.which} network of {f.state_dict} to {out}')


def _define_flags():
  cli.define_config_flag('config', default='brats', help_string=(
      'The network configuration: ' + configs.CONFIG_HELP + '.'))
  flags.DEFINE_string('state_dict', None, 'The authors\' state_dict or training checkpoint '
                      '(.pth/.pt, or .npz of NumPy arrays).', required=True)
  flags.DEFINE_string('out', None, 'Folder of the single-network export.', required=True)
  flags.DEFINE_enum('which', 'student', sorted(NETWORK_KEYS),
                    'Network of a whole training checkpoint: student (model_missing) or '
                    'teacher (model_full).')
  flags.DEFINE_bool('allow_pickle', False, 'Read a trusted .pth with full pickle.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing export in --out.')


USAGE = """Import the authors' PyTorch MST-KDNet weights as a network export.

  mstkd-convert --state_dict FILE --config=brats --out DIR \\
      [--which student|teacher] [--allow_pickle] [--overwrite]

FILE: a state_dict or the authors' whole training checkpoint (.pth / .pt with torch
installed, or .npz with the same names). The export is read by --mode=eval, predict and
visualize like an exported student (docs/evaluation.md).
"""


def console_main():
  """The ``mstkd-convert`` command (``pip install .``): ``python -m mstkd_jax.convert_torch``."""
  cli.run(main, _define_flags, USAGE)


if __name__ == '__main__':
  console_main()
