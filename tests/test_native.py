"""The oneDNN convolutions (mstkd_jax/native) and the matmul form of the transposed conv."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mstkd_jax.models.layers import Deconv2
from mstkd_jax.native import onednn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lax(x, w, stride, padding):
  return jax.lax.conv_general_dilated(x, w, (stride,) * 3, ((padding, padding),) * 3,
                                      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))


def _value_and_grads(conv, x, w):
  def loss(x, w):
    y = conv(x, w)
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y.astype(jnp.float32) * weights), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, w)
  return y, grads


def test_onednn_builds_and_serves_float32():
  """requirements.txt installs oneDNN: on the CPU the fast path must be there (no silent
  fallback in CI)."""
  assert jnp.float32 in onednn.load(), onednn.reason()


@pytest.mark.parametrize('shape,kernel,cin,cout,stride,padding', [
    ((9, 8, 7), 3, 5, 6, 1, 1),      # ResBlock conv, odd sizes
    ((10, 8, 6), 3, 4, 8, 2, 1),     # strided down-sampling (right padding 0 on even sizes)
    ((8, 8, 8), 1, 6, 3, 1, 0),      # 1x1 projections
    ((8, 12, 8), 4, 3, 5, 4, 0),     # patch embedding: kernel = stride, 'VALID'
    ((8, 8, 8), 4, 3, 2, 2, 1),      # the discriminator's k4 s2 p1
])
def test_conv3d_matches_xla_forward_and_gradients(shape, kernel, cin, cout, stride, padding):
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(2, *shape, cin), jnp.float32)
  w = jnp.asarray(rs.randn(kernel, kernel, kernel, cin, cout) * 0.3, jnp.float32)
  y1, (dx1, dw1) = _value_and_grads(lambda x, w: onednn.conv3d(x, w, stride, padding), x, w)
  y2, (dx2, dw2) = _value_and_grads(lambda x, w: _lax(x, w, stride, padding), x, w)
  assert y1.shape == y2.shape
  for a, b in ((y1, y2), (dx1, dx2), (dw1, dw2)):
    a, b = np.asarray(a), np.asarray(b)
    # float32 sums in another order: errors of about 1e-7 of the largest value.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.max(np.abs(b)))


def test_conv3d_under_vmap_and_jacrev_matches_xla():
  """vmap (and so jax.jacrev, per-example gradients) over the oneDNN conv: its kernel takes 5-D
  operands only, so the mapped axis runs element by element; once it raised
  NotImplementedError (found by experiments/term_gradients.py)."""
  assert jnp.float32 in onednn.load(), onednn.reason()
  rs = np.random.RandomState(2)
  x = jnp.asarray(rs.randn(3, 1, 6, 5, 4, 2), jnp.float32)   # a mapped axis of 3
  w = jnp.asarray(rs.randn(3, 3, 3, 2, 4) * 0.3, jnp.float32)
  ours = jax.jit(jax.vmap(lambda x: onednn.conv3d(x, w, 1, 1)))(x)
  ref = jax.vmap(lambda x: _lax(x, w, 1, 1))(x)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # Two outputs, reverse mode: vmap over the pullback's cotangents (backward-data and -filter).
  two = lambda conv: (lambda w: jnp.stack([jnp.sum(conv(x[0], w)), jnp.sum(conv(x[1], w) ** 2)]))
  j1 = jax.jit(jax.jacrev(two(lambda x, w: onednn.conv3d(x, w, 1, 1))))(w)
  j2 = jax.jacrev(two(lambda x, w: _lax(x, w, 1, 1)))(w)
  np.testing.assert_allclose(np.asarray(j1), np.asarray(j2), rtol=1e-4,
                             atol=1e-5 * float(np.max(np.abs(j2))))


def test_conv3d_bfloat16_close_to_float32():
  if jnp.bfloat16 not in onednn.load():
    pytest.skip('this CPU has no bfloat16 convolutions in oneDNN')
  rs = np.random.RandomState(1)
  x = jnp.asarray(rs.randn(1, 8, 8, 8, 16), jnp.float32)
  w = jnp.asarray(rs.randn(3, 3, 3, 16, 16) * 0.1, jnp.float32)
  y16 = jax.jit(lambda x, w: onednn.conv3d(x, w, 1, 1))(x.astype(jnp.bfloat16),
                                                          w.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(_lax(x, w, 1, 1)),
                             rtol=0.05, atol=0.05)


def test_dispatch_uses_onednn_only_where_it_applies():
  x = jnp.ones((1, 8, 8, 8, 4), jnp.float32)
  w = jnp.ones((3, 3, 3, 4, 4), jnp.float32)
  dn = ('NDHWC', 'DHWIO', 'NDHWC')

  def hlo(**kw):
    f = lambda x, w: onednn.conv_general_dilated(x, w, kw.pop('strides', (1, 1, 1)),
                                                  kw.pop('padding', [(1, 1)] * 3),
                                                  dimension_numbers=dn, **kw)
    return jax.jit(f).lower(x, w).as_text()

  assert 'mstkd_conv3d_fwd' in hlo()
  assert 'mstkd_conv3d_fwd' in hlo(padding='VALID')
  # Asymmetric padding, dilation, unequal strides: XLA's convolution, same values.
  assert 'mstkd_conv3d_fwd' not in hlo(padding=[(1, 0)] * 3)
  assert 'mstkd_conv3d_fwd' not in hlo(rhs_dilation=(2, 2, 2))
  assert 'mstkd_conv3d_fwd' not in hlo(strides=(1, 2, 1))
  ours = onednn.conv_general_dilated(x, w, (1, 1, 1), [(1, 0)] * 3, dimension_numbers=dn)
  ref = jax.lax.conv_general_dilated(x, w, (1, 1, 1), [(1, 0)] * 3, dimension_numbers=dn)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_without_a_compiler_falls_back_to_xla_with_one_warning(tmp_path):
  """No C++ compiler (or no oneDNN): one warning naming why, and the XLA convolution."""
  code = ('import jax, jax.numpy as jnp\n'
          'from mstkd_jax.native import onednn\n'
          'x = jnp.ones((1, 4, 4, 4, 2)); w = jnp.ones((3, 3, 3, 2, 2))\n'
          'y = jax.jit(lambda x, w: onednn.conv_general_dilated(x, w, (1, 1, 1), '
          '[(1, 1)] * 3, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")))(x, w)\n'
          'print("centre", float(y[0, 1, 1, 1, 0]), "dtypes", onednn.load())\n')
  env = dict(os.environ, MSTKD_NATIVE_CACHE=str(tmp_path), CXX='/nonexistent/c++',
             MSTKD_CONV='auto', PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert 'centre 54.0 dtypes ()' in proc.stdout
  assert proc.stderr.count('oneDNN convolutions unavailable') == 1
  assert '/nonexistent/c++' in proc.stderr
  # MSTKD_CONV=onednn makes the same situation an error.
  env['MSTKD_CONV'] = 'onednn'
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode != 0
  assert 'MSTKD_CONV=onednn, but' in proc.stderr


def test_the_self_check_runs_once_per_library_jax_version_and_machine(tmp_path):
  """A fresh process checks the library and notes the types that passed; the next one trusts
  the note; a note from another jax version is checked again."""
  assert onednn.load(), onednn.reason()
  library = onednn.library_path(onednn._onednn_prefix())  # pylint: disable=protected-access
  copied = tmp_path / os.path.basename(library)
  copied.write_bytes(open(library, 'rb').read())
  code = ('from mstkd_jax.native import onednn\n'
          'calls = []\n'
          'real = onednn._self_check\n'
          'onednn._self_check = lambda d: calls.append(d) or real(d)\n'
          'print("dtypes", len(onednn.load()), "checks", len(calls))\n')
  env = dict(os.environ, MSTKD_NATIVE_CACHE=str(tmp_path), MSTKD_CONV='auto', PYTHONPATH=ROOT)
  run = lambda: subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                               env=env, timeout=300)
  first, second = run(), run()
  assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
  served = first.stdout.split()[1]
  assert f'dtypes {served} checks 2' in first.stdout
  assert f'dtypes {served} checks 0' in second.stdout
  record = str(copied) + '.checked.json'
  text = open(record).read()
  with open(record, 'w') as f:
    f.write(text.replace(jax.__version__, '0.0.1'))
  assert 'checks 2' in run().stdout


def test_bad_mode_is_named(monkeypatch):
  monkeypatch.setenv('MSTKD_CONV', 'fast')
  with pytest.raises(ValueError, match="MSTKD_CONV='fast'"):
    onednn.mode()


def test_deconv2_equals_flax_conv_transpose():
  """Same parameters (names, shapes, initial values) and outputs as the transposed conv it
  replaces, gradients included."""
  x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 4, 5, 6), jnp.float32)
  ours = Deconv2(7)
  flax_ref = nn.ConvTranspose(7, (2, 2, 2), strides=(2, 2, 2), padding='VALID',
                              transpose_kernel=True)
  v_ours, v_ref = ours.init(jax.random.key(3), x), flax_ref.init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_ref)
  for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape), v_ref)
  np.testing.assert_allclose(np.asarray(ours.apply(v, x)), np.asarray(flax_ref.apply(v, x)),
                             rtol=1e-6, atol=1e-6)
  g1 = jax.grad(lambda v: jnp.sum(jnp.sin(ours.apply(v, x))))(v)
  g2 = jax.grad(lambda v: jnp.sum(jnp.sin(flax_ref.apply(v, x))))(v)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_an_unwritable_cache_folder_builds_in_a_private_temporary_folder(tmp_path):
  """MSTKD_CACHE_DIR that cannot be written (here below a file, which stops root too): the
  library is built in $TMPDIR/mstkd_jax-<uid>/native and the convolutions still run through
  oneDNN, not XLA's."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  temporary = tmp_path / 'tmp'
  temporary.mkdir()
  code = ('from mstkd_jax.native import onednn\n'
          'print("dtypes", len(onednn.load()), "reason", onednn.reason())\n')
  env = dict(os.environ, MSTKD_CACHE_DIR=str(blocker / 'cache'), TMPDIR=str(temporary),
             MSTKD_CONV='onednn', PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env.pop('MSTKD_NATIVE_CACHE', None)
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'reason None' in proc.stdout and 'dtypes 0' not in proc.stdout, proc.stdout
  folder = temporary / f'mstkd_jax-{os.getuid()}' / 'native'
  assert [n for n in os.listdir(folder) if n.endswith('.so')], os.listdir(folder)
  assert oct(os.stat(folder.parent).st_mode & 0o777) == '0o700'
