"""3D convolutions through oneDNN on the CPU, registered with XLA as FFI custom calls.

XLA:CPU runs this network's 3D convolutions at a tenth of what the same two cores reach with
oneDNN (experiments/RESULTS_speed.md); the convolutions are about 90 % of a CPU training step.
``conv3d(x, w, stride, padding)`` computes the same convolution (channels-last x
(N, S1, S2, S3, C), Flax kernel (K1, K2, K3, C, O), one stride and one symmetric padding for
the three axes) with oneDNN's kernels, forward and backward (a ``jax.custom_vjp`` whose
backward pass is oneDNN's backward-data and backward-weights primitives).

The C++ handlers (``onednn_conv3d.cc`` beside this file) are compiled with the system's C++
compiler against oneDNN from the ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp`` wheels
(requirements.txt) and jaxlib's XLA FFI headers, on first use, into a cache folder
(``$MSTKD_NATIVE_CACHE``, else ``native/`` under ``$MSTKD_CACHE_DIR`` or
``~/.cache/mstkd_jax``; when that folder cannot be written and holds no built library, a
folder of this user's own in the temporary directory, ``$TMPDIR/mstkd_jax-<uid>/native``);
later processes load the built library. Before first use each data type is checked against
``lax.conv_general_dilated`` on a small case, once per library build, jax version and machine
(the types that passed are noted beside the library, in ``<library>.checked.json``).

``$MSTKD_CONV`` chooses: ``auto`` (default: oneDNN on the CPU backend when it builds and passes
that check; otherwise, with one log line saying why, XLA's convolution), ``xla`` (never
oneDNN) or ``onednn`` (oneDNN or an error). On GPUs the setting is ignored: cuDNN through XLA
is used.
"""

import ctypes
import fcntl
import functools
import hashlib
import json
import os
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

from mstkd_jax import compile_cache
from mstkd_jax import fileio

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'onednn_conv3d.cc')
TARGETS = {'mstkd_conv3d_fwd': 'MstkdConv3dForward',
           'mstkd_conv3d_bwd_data': 'MstkdConv3dBackwardData',
           'mstkd_conv3d_bwd_weights': 'MstkdConv3dBackwardWeights'}
MODES = ('auto', 'xla', 'onednn')


class NativeUnavailable(RuntimeError):
  """The oneDNN convolutions cannot be used here (the message says why)."""


def mode():
  value = os.environ.get('MSTKD_CONV', 'auto').strip().lower() or 'auto'
  if value not in MODES:
    raise ValueError(f'MSTKD_CONV={value!r}: expected one of {", ".join(MODES)}')
  return value


def _onednn_prefix():
  """The installation prefix holding oneDNN's header and library (the wheels' data files)."""
  candidates = [sys.prefix, sys.base_prefix, sysconfig.get_paths().get('data', ''),
                site.getuserbase(), os.environ.get('MSTKD_ONEDNN_PREFIX', '')]
  for prefix in candidates:
    if (prefix and os.path.exists(os.path.join(prefix, 'include', 'oneapi', 'dnnl', 'dnnl.hpp'))
        and os.path.exists(os.path.join(prefix, 'lib', 'libdnnl.so.3'))):
      return prefix
  raise NativeUnavailable('oneDNN is not installed (pip install onednn-cpu-gomp==2023.2.0 '
                          'onednn-devel-cpu-gomp==2023.2.0; see requirements.txt)')


def _cache_dir():
  return os.environ.get('MSTKD_NATIVE_CACHE') or os.path.join(compile_cache.cache_root(),
                                                              'native')


def _private_temporary_dir():
  """``$TMPDIR/mstkd_jax-<uid>/native``, created for this user alone (mode 0700); refused when
  someone else owns it or others may write into it (a library loaded from there runs)."""
  parent = os.path.join(tempfile.gettempdir(), f'mstkd_jax-{os.getuid()}')
  os.makedirs(parent, mode=0o700, exist_ok=True)
  st = os.lstat(parent)
  private = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
  if not private:
    raise NativeUnavailable(f'{_cache_dir()} cannot be written and {parent} is not a folder '
                            'of this user alone; set MSTKD_NATIVE_CACHE to a writable folder')
  return os.path.join(parent, 'native')


def _writable(folder):
  """True when files can be created in ``folder`` (created if needed)."""
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      return True
  except OSError:
    return False


def _compiler():
  return os.environ.get('CXX', 'g++')


def library_path(prefix, folder=None):
  """Where the library built from this source, jaxlib and oneDNN prefix lives (in ``folder``,
  default the cache folder)."""
  with open(SOURCE, 'rb') as f:
    digest = hashlib.sha256(f.read())
  digest.update(f'{jaxlib.__version__}|{prefix}|{_compiler()}'.encode())
  return os.path.join(folder or _cache_dir(), f'libmstkd_onednn_{digest.hexdigest()[:16]}.so')


def build(prefix):
  """Compiles the handlers once (a file lock keeps concurrent processes from racing), in the
  cache folder, or in a private temporary folder when the cache folder cannot be written."""
  path = library_path(prefix)
  if os.path.exists(path):
    return path
  if not _writable(os.path.dirname(path)):
    fallback = library_path(prefix, _private_temporary_dir())
    logging.info('cannot write into %s: the oneDNN convolutions are built in %s',
                 os.path.dirname(path), os.path.dirname(fallback))
    path = fallback
    if os.path.exists(path):
      return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(path):
      return path
    tmp = tempfile.mktemp(suffix='.so', dir=os.path.dirname(path))
    cmd = [_compiler(), '-O2', '-std=c++17', '-shared', '-fPIC', '-w',
           '-I', jax.ffi.include_dir(), '-I', os.path.join(prefix, 'include'), SOURCE,
           '-L', os.path.join(prefix, 'lib'), '-l:libdnnl.so.3',
           f'-Wl,-rpath,{os.path.join(prefix, "lib")}', '-o', tmp]
    logging.info('building the oneDNN convolutions: %s', ' '.join(cmd))
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise NativeUnavailable(f'cannot run the C++ compiler {_compiler()!r}: {e}') from e
    if proc.returncode:
      raise NativeUnavailable(f'compiling {SOURCE} failed:\n{proc.stderr[-2000:]}')
    os.replace(tmp, path)
  return path


_LOCK = threading.Lock()
_STATE = {'loaded': None, 'reason': None, 'dtypes': ()}


def _register(path):
  lib = ctypes.CDLL(path)
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform='cpu')
  return lib


def _self_check(dtype):
  """oneDNN's forward and both gradients against XLA's on a small strided case."""
  # This process's own CPU device: in a multi-process run jax.devices()[0] may belong to
  # another process, and nothing here may involve the other processes.
  on_cpu = jax.local_devices(backend='cpu')[0]
  rs = np.random.RandomState(0)
  x = jax.device_put(np.asarray(rs.randn(1, 6, 5, 7, 3), dtype), on_cpu)
  w = jax.device_put(np.asarray(rs.randn(3, 3, 3, 3, 4) * 0.2, dtype), on_cpu)

  def loss(conv, x, w):
    y = conv(x, w)
    return jnp.sum(y.astype(jnp.float32) * jnp.arange(y.size, dtype=jnp.float32).reshape(
        y.shape) / y.size), y

  ours = lambda x, w: conv3d(x, w, 2, 1)
  ref = lambda x, w: _lax_conv(x, w, 2, 1)
  with jax.default_device(on_cpu):
    (_, y1), g1 = jax.jit(jax.value_and_grad(functools.partial(loss, ours), (0, 1),
                                             has_aux=True))(x, w)
    (_, y2), g2 = jax.jit(jax.value_and_grad(functools.partial(loss, ref), (0, 1),
                                             has_aux=True))(x, w)
  tol = 1e-4 if dtype == jnp.float32 else 5e-2
  for name, a, b in (('forward', y1, y2), ('input gradient', g1[0], g2[0]),
                     ('kernel gradient', g1[1], g2[1])):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err = float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
    if not err <= tol:
      raise NativeUnavailable(f'oneDNN {np.dtype(dtype).name} {name} differs from XLA\'s by '
                              f'{err:.2e} (relative)')


def _check_record(path):
  """Where the data types that passed ``_self_check`` with the library ``path`` are noted, and
  what must match for a later process to trust that note (jax, jaxlib, the machine)."""
  return path + '.checked.json', {'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
                                  'machine': compile_cache.machine_tag()}


def _checked_before(path):
  """The data types an earlier process checked with this library here, or None."""
  record, expected = _check_record(path)
  try:
    with open(record) as f:
      noted = json.load(f)
  except (OSError, ValueError):
    return None
  if {k: noted.get(k) for k in expected} != expected:
    return None
  names = {np.dtype(d).name: d for d in (jnp.float32, jnp.bfloat16)}
  return tuple(names[n] for n in noted.get('dtypes', ()) if n in names)


def _load_and_check():
  path = build(_onednn_prefix())
  _STATE['library'] = _register(path)
  checked = _checked_before(path)
  if checked:   # once per library build, jax version and machine (about a second each start)
    return checked
  dtypes = []
  for dtype in (jnp.float32, jnp.bfloat16):
    _STATE['dtypes'] = tuple(dtypes) + (dtype,)   # lets the check run this type
    try:
      _self_check(dtype)
      dtypes.append(dtype)
    except Exception as e:  # pylint: disable=broad-except
      if dtype == jnp.float32:
        raise
      logging.info('oneDNN convolutions: %s not used (%s)', np.dtype(dtype).name, e)
  record, noted = _check_record(path)
  try:
    fileio.write_json_atomic(record, dict(noted, dtypes=[np.dtype(d).name for d in dtypes]))
  except OSError:
    pass
  return tuple(dtypes)


def load():
  """Builds, registers and checks the handlers once per process; returns the data types they
  serve (empty when unavailable; ``reason()`` says why)."""
  with _LOCK:
    if _STATE['loaded'] is None:
      _STATE['loaded'] = False
      outcome = {}

      def work():
        try:
          outcome['dtypes'] = _load_and_check()
        except Exception as e:  # pylint: disable=broad-except
          outcome['error'] = e

      # In a thread of its own: load() is usually reached while a step is being traced, and
      # the check must run real computations, outside that trace (trace state is per thread).
      worker = threading.Thread(target=work, name='mstkd-onednn-load')
      worker.start()
      worker.join()
      if 'error' in outcome:
        e = outcome['error']
        _STATE['dtypes'] = ()
        _STATE['reason'] = str(e)
        if mode() == 'onednn':
          raise NativeUnavailable(f'MSTKD_CONV=onednn, but: {e}') from e
        if jax.process_count() > 1:
          # Falling back here alone would give this process a different program from the
          # others, and their collectives would no longer match.
          raise NativeUnavailable(
              f'oneDNN convolutions unavailable in process {jax.process_index()} of a '
              f'multi-process run ({str(e).splitlines()[0]}); set MSTKD_CONV=xla for every '
              'process') from e
        logging.warning('oneDNN convolutions unavailable, using XLA\'s (slower on the CPU): %s',
                        str(e).splitlines()[0])
      else:
        _STATE['dtypes'] = outcome['dtypes']
        _STATE['loaded'] = True
        logging.info('3D convolutions on the CPU run through oneDNN (%s)',
                     ', '.join(np.dtype(d).name for d in _STATE['dtypes']))
    return _STATE['dtypes']


def reason() -> Optional[str]:
  return _STATE['reason']


def _lax_conv(x, w, stride, padding):
  return jax.lax.conv_general_dilated(x, w, (stride,) * 3, ((padding, padding),) * 3,
                                      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))


def output_shape(x_shape, w_shape, stride, padding):
  spatial = tuple((s + 2 * padding - k) // stride + 1 for s, k in zip(x_shape[1:4], w_shape[:3]))
  return (x_shape[0],) + spatial + (w_shape[4],)


def _call(target, shape, dtype, *operands, stride, padding):
  # Under vmap (jax.jacrev, per-example gradients) the kernel runs once per mapped element:
  # it takes 5-D operands only.
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype),
                          vmap_method='sequential')(
      *operands, stride=np.int64(stride), padding=np.int64(padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3d(x, w, stride, padding):
  """y (N, T1, T2, T3, O) = conv(x (N, S1, S2, S3, C), w (K1, K2, K3, C, O)), stride and
  symmetric padding on every spatial axis; x and w of one dtype (float32 or bfloat16)."""
  return _call('mstkd_conv3d_fwd', output_shape(x.shape, w.shape, stride, padding), x.dtype,
               x, w, stride=stride, padding=padding)


def _conv3d_fwd(x, w, stride, padding):
  return conv3d(x, w, stride, padding), (x, w)


def _conv3d_bwd(stride, padding, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  dx = _call('mstkd_conv3d_bwd_data', x.shape, x.dtype, dy, w, stride=stride, padding=padding)
  dw = _call('mstkd_conv3d_bwd_weights', w.shape, w.dtype, x, dy, stride=stride,
             padding=padding)
  return dx, dw


conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)


def _uniform(values):
  values = tuple(values)
  return values[0] if values and all(v == values[0] for v in values) else None


def _symmetric_padding(padding, rank):
  if isinstance(padding, str):
    return 0 if padding.upper() == 'VALID' else None
  pairs = [tuple(p) for p in padding]
  if len(pairs) != rank or any(lo != hi for lo, hi in pairs):
    return None
  return _uniform(lo for lo, _ in pairs)


def _channels_last_3d(lhs, rhs, dimension_numbers):
  wanted = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NDHWC', 'DHWIO', 'NDHWC'))
  given = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return given == wanted


def use_onednn(dtype) -> bool:
  """Whether convolutions traced now run through oneDNN (CPU backend, available, enabled)."""
  if mode() == 'xla' or jax.default_backend() != 'cpu':
    return False
  return any(jnp.dtype(dtype) == jnp.dtype(d) for d in load())


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``, through oneDNN where it can be (see the module doc):
  3D, channels-last, one stride and one symmetric padding, no dilation or groups."""
  stride = _uniform(window_strides)
  pad = _symmetric_padding(padding, len(window_strides))
  plain = (lhs.ndim == 5 and stride is not None and pad is not None
           and feature_group_count == 1 and batch_group_count == 1
           and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1,))) and all(
               d == 1 for d in (rhs_dilation or (1,)))
           and lhs.dtype == rhs.dtype and dimension_numbers is not None
           and _channels_last_3d(lhs, rhs, dimension_numbers))
  if plain and use_onednn(lhs.dtype):
    return conv3d(lhs, rhs, stride, pad)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
