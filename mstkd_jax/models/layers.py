"""Building blocks shared by the network and the transformer branch (channels-last, 3D).

Every convolution pads symmetrically like PyTorch (kernel 3 -> pad 1 on both sides), never
``'SAME'``, which pads stride-2 convolutions of even sizes asymmetrically (PyTorch pads both sides equally).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mstkd_jax.native import onednn

Dtype = Any


# PyTorch's default initialisation of Conv3d weights (kaiming_uniform with a = sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), a third of the variance of Flax's lecun_normal. With
# Flax's default the residual sums grow so much that the initial logits reach |5| and the
# sigmoid outputs start saturated (a student then barely learns in short runs).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def conv(features, kernel=3, stride=1, padding=None, dtype=jnp.float32, name=None):
  """3D convolution with bias and PyTorch-style symmetric padding ((k - 1) // 2 per side)
  and PyTorch's default weight initialisation; on the CPU it runs through oneDNN
  (``mstkd_jax.native.onednn``), elsewhere through XLA."""
  pad = (kernel - 1) // 2 if padding is None else padding
  return nn.Conv(features, (kernel,) * 3, strides=(stride,) * 3, padding=((pad, pad),) * 3,
                 dtype=dtype, name=name, kernel_init=torch_conv_init,
                 conv_general_dilated=onednn.conv_general_dilated)


class Deconv2(nn.Module):
  """Transposed convolution, kernel 2, stride 2, no padding: doubles each spatial size.

  PyTorch's ``ConvTranspose3d(k=2, s=2)``: every input voxel writes its own 2x2x2 output block,
  y[2i+a, 2j+b, 2k+c, o] = sum_ci x[i, j, k, ci] kernel[a, b, c, o, ci] + bias[o], with kernel
  (2, 2, 2, out, in) = PyTorch's weight (in, out, 2, 2, 2) moved (convert_torch.py), the layout
  and initialisation of Flax's ``nn.ConvTranspose(transpose_kernel=True)``. Computed as one
  matrix product (N H W D, in) @ (in, 8 out) and a reshuffle of the blocks: unlike a strided
  transposed convolution, its gradients are matrix products too (XLA:CPU runs the convolution
  form's kernel gradient at about 1 GFLOP/s; experiments/RESULTS_speed.md).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, d, c = x.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (2, 2, 2, self.features, c),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    y = jnp.einsum('nhwdc,abeoc->nhwdabeo', x, kernel)
    y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, 2 * h, 2 * w, 2 * d, self.features)
    return y + bias


def deconv(features, dtype=jnp.float32, name=None):
  """Transposed convolution, kernel 2, stride 2 (``Deconv2``)."""
  return Deconv2(features, dtype=dtype, name=name)


def upsample2(x):
  """Nearest-neighbour upsampling by 2 on the three spatial axes of (N, H, W, D, C)."""
  for axis in (1, 2, 3):
    x = jnp.repeat(x, 2, axis=axis)
  return x


def maxpool2(x):
  """Max pooling, window 2, stride 2, on (N, H, W, D, C)."""
  return nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))


class ResBlock(nn.Module):
  """x + conv3(relu(GN(conv3(relu(GN(x)))))) with GroupNorm(groups, eps 1e-5)."""
  groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = x.shape[-1]
    y = nn.relu(nn.GroupNorm(self.groups, epsilon=1e-5, dtype=self.dtype, name='gn1')(x))
    y = conv(k, dtype=self.dtype, name='conv1')(y)
    y = nn.relu(nn.GroupNorm(self.groups, epsilon=1e-5, dtype=self.dtype, name='gn2')(y))
    y = conv(k, dtype=self.dtype, name='conv2')(y)
    return x + y


class BatchNorm(nn.Module):
  """BatchNorm over (N, H, W, D) like PyTorch's BatchNorm3d (eps 1e-5, momentum 0.1).

  Training normalises with the biased batch variance and updates the running variance with the
  unbiased one, as PyTorch does; evaluation uses the running statistics. Statistics are taken
  in float32 over the whole (global) batch, so they do not depend on how the batch is sharded.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean_ra = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    var_ra = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / max(n - 1, 1))
        mean_ra.value = (1 - self.momentum) * mean_ra.value + self.momentum * mean
        var_ra.value = (1 - self.momentum) * var_ra.value + self.momentum * unbiased
    else:
      mean, var = mean_ra.value, var_ra.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class ConvBlock(nn.Module):
  """conv3 (stride s) -> BatchNorm -> ReLU (the UNETR decoder's ConvBlock)."""
  features: int
  stride: int = 1
  kernel: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(self.features, self.kernel, self.stride, dtype=self.dtype, name='conv')(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name='bn')(x, train))


class DeconvBlock(nn.Module):
  """transposed conv k2 s2 -> conv3 -> BatchNorm -> ReLU (the UNETR decoder's DeconvBlock)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = deconv(self.features, dtype=self.dtype, name='deconv')(x)
    x = conv(self.features, dtype=self.dtype, name='conv')(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name='bn')(x, train))
