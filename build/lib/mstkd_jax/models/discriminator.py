"""The style discriminator: one logit per sample from a (N, h, w, d, C) style map.

Default (map 20x24x16x128): conv k4 s2 p1 128->64, LeakyReLU 0.2, conv k4 s2 p1 64->128,
LeakyReLU, conv k4 s2 p1 128->256, LeakyReLU, conv kernel (2, 3, 2) 'valid' 256->1 -> (N,).
The last kernel is whatever the map's size is after the stride-2 stages (k4 s2 p1 maps n to
n // 2), so small maps work with fewer or narrower stages (``channels``).
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from mstkd_jax.models.layers import conv


def final_kernel(spatial_shape, stages):
  """Spatial size left after ``stages`` k4-s2-p1 convolutions (the last conv's kernel)."""
  size = tuple(spatial_shape)
  for _ in range(stages):
    size = tuple(s // 2 for s in size)
  if min(size) < 1:
    raise ValueError(f'style map {tuple(spatial_shape)} is too small for {stages} stride-2 '
                     'discriminator stages; use fewer discriminator.channels')
  return size


class StyleDiscriminator(nn.Module):
  channels: Sequence[int] = (64, 128, 256)

  @nn.compact
  def __call__(self, s):
    s = s.astype(jnp.float32)
    kernel = final_kernel(s.shape[1:4], len(self.channels))
    for i, ch in enumerate(self.channels):
      s = nn.leaky_relu(conv(ch, kernel=4, stride=2, padding=1, name=f'conv{i}')(s), 0.2)
    s = nn.Conv(1, kernel, padding='VALID', name='conv_out')(s)
    return s.reshape(s.shape[0])
