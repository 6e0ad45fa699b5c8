"""One 3D convolution, XLA's against oneDNN's (mstkd_jax/native), forward and forward + backward.

  python experiments/bench_conv.py                 # the network's typical layers
  python experiments/bench_conv.py --dtypes float32 --repeats 5

Prints one JSON line per (shape, dtype): GFLOP/s of ``lax.conv_general_dilated`` and of
``onednn.conv3d`` (forward; forward + both gradients counted as 3x the forward's FLOPs), and
the largest difference of their outputs. Batch 1, channels-last, kernel 3, padding 1.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mstkd_jax.native import onednn  # noqa: E402

# (spatial shape, in channels, out channels, stride): layers of the network at 64^3 and at
# the full size's second level (80x96x64x32).
LAYERS = [((64, 64, 64), 4, 16, 1), ((64, 64, 64), 16, 16, 1), ((64, 64, 64), 16, 32, 2),
          ((32, 32, 32), 32, 32, 1), ((16, 16, 16), 64, 64, 1), ((80, 96, 64), 32, 32, 1)]


def best_time(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  served = onednn.load()
  for shape, cin, cout, stride in LAYERS:
    for dtype_name in args.dtypes.split(','):
      dtype = jnp.dtype(dtype_name)
      if dtype not in [jnp.dtype(d) for d in served]:
        print(json.dumps({'shape': shape, 'dtype': dtype_name, 'error': 'not served by oneDNN '
                          f'here ({onednn.reason()})'}))
        continue
      rs = np.random.RandomState(0)
      x = jnp.asarray(rs.rand(1, *shape, cin), dtype)
      w = jnp.asarray(rs.rand(3, 3, 3, cin, cout) * 0.1, dtype)
      out_voxels = int(np.prod([s // stride for s in shape]))
      gflop = out_voxels * 27 * cin * cout * 2 / 1e9
      result = {'shape': list(shape), 'cin': cin, 'cout': cout, 'stride': stride,
                'dtype': dtype_name, 'gflop_forward': round(gflop, 3)}
      outputs = {}
      for name, conv in (('xla', lambda x, w: onednn._lax_conv(x, w, stride, 1)),
                         ('onednn', lambda x, w: onednn.conv3d(x, w, stride, 1))):
        forward = jax.jit(conv)
        grads = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(
            conv(x, w).astype(jnp.float32) ** 2), argnums=(0, 1)))
        t_fwd = best_time(lambda: forward(x, w).block_until_ready(), args.repeats)
        t_all = best_time(lambda: jax.block_until_ready(grads(x, w)), args.repeats)
        result[f'{name}_gflops_forward'] = round(gflop / t_fwd, 1)
        result[f'{name}_gflops_forward_backward'] = round(3 * gflop / t_all, 1)
        outputs[name] = np.asarray(forward(x, w), np.float32)
      result['max_abs_diff'] = float(np.max(np.abs(outputs['xla'] - outputs['onednn'])))
      result['max_abs_value'] = float(np.max(np.abs(outputs['xla'])))
      print(json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
