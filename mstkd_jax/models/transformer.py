"""The transformer branch: a UNETR on the encoder's bottleneck map (docs/method.md, "Network").

Patch embedding (conv, kernel = stride = patch) -> learned position embedding -> pre-norm
transformer blocks that also return their attention probabilities -> a convolutional decoder
that turns the kept hidden states into four multi-scale maps and one output map.

At the default size (bottleneck 20x24x16x128, patch 4, 768 wide, 12 blocks, kept 3/6/9/12):
tokens 5x6x4 = 120; attention maps (N, 12, 120, 120); decoded features
z3' (20,24,16,64), z6' (40,48,32,128), z9' (20,24,16,256), z12' (10,12,8,512); output
(20,24,16,128).
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mstkd_jax.models.layers import ConvBlock, DeconvBlock, conv, deconv
from mstkd_jax.native import onednn

Dtype = Any


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v linears; returns (output, probabilities).

  probs = softmax(q k^T / sqrt(head_dim)) of shape (N, heads, T, T), taken before dropout.
  """
  num_heads: int
  dropout: float
  attention_dropout: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    n, t, k = x.shape
    head = k // self.num_heads
    split = lambda y: y.reshape(n, t, self.num_heads, head).transpose(0, 2, 1, 3)
    q = split(nn.Dense(k, dtype=self.dtype, name='query')(x))
    key = split(nn.Dense(k, dtype=self.dtype, name='key')(x))
    v = split(nn.Dense(k, dtype=self.dtype, name='value')(x))
    scores = jnp.einsum('nhqd,nhkd->nhqk', q, key).astype(jnp.float32) / math.sqrt(head)
    probs = nn.softmax(scores, axis=-1)
    dropped = nn.Dropout(self.attention_dropout)(probs, deterministic=not train)
    y = jnp.einsum('nhqk,nhkd->nhqd', dropped.astype(self.dtype), v)
    y = y.transpose(0, 2, 1, 3).reshape(n, t, k)
    y = nn.Dense(k, dtype=self.dtype, name='out')(y)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return y, probs


class TransformerBlock(nn.Module):
  """Pre-norm block: x + MHSA(LN(x)); x + w_2(dropout(relu(w_1(LN(x))))) (LayerNorm eps 1e-6)."""
  num_heads: int
  mlp_dim: int
  dropout: float
  attention_dropout: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    k = x.shape[-1]
    h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='attention_norm')(x)
    h, probs = SelfAttention(self.num_heads, self.dropout, self.attention_dropout,
                             dtype=self.dtype, name='attn')(h, train)
    x = x + h
    h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='mlp_norm')(x)
    h = nn.relu(nn.Dense(self.mlp_dim, dtype=self.dtype, name='w_1')(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.Dense(k, dtype=self.dtype, name='w_2')(h)
    return x + h, probs


class Transformer(nn.Module):
  """Patch embedding + position embedding + blocks; returns the kept hidden states and probs."""
  embed_dim: int
  num_heads: int
  num_layers: int
  mlp_dim: int
  patch_size: int
  kept_blocks: Sequence[int]
  dropout: float
  attention_dropout: float
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    p = self.patch_size
    tokens = nn.Conv(self.embed_dim, (p, p, p), strides=(p, p, p), padding='VALID',
                     dtype=self.dtype, name='patch_embeddings',
                     conv_general_dilated=onednn.conv_general_dilated)(x)
    n, gh, gw, gd, k = tokens.shape
    tokens = tokens.reshape(n, gh * gw * gd, k)  # row-major over (H, W, D), like PyTorch
    pos = self.param('position_embeddings', nn.initializers.zeros, (1, gh * gw * gd, k),
                     jnp.float32)
    h = nn.Dropout(self.dropout)(tokens + pos.astype(self.dtype), deterministic=not train)
    block_cls = nn.remat(TransformerBlock, static_argnums=(2,)) if self.remat else TransformerBlock
    hidden, probs = [], []
    for i in range(self.num_layers):
      h, a = block_cls(self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout,
                       dtype=self.dtype, name=f'layer_{i}')(h, train)
      if i + 1 in self.kept_blocks:
        hidden.append(h)
        probs.append(a)
    # The authors' module owns a final LayerNorm that its forward pass never uses; we keep its
    # parameters (for the exact parameter count and weight import) and drop its output.
    nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='encoder_norm')(h)
    return hidden, probs, (gh, gw, gd)


class UNETRBranch(nn.Module):
  """Transformer plus the UNETR convolutional decoder.

  ``transformer`` is an unbound ``Transformer`` (its sizes live there only); it is adopted as
  the submodule 'transformer'. Returns (output map with ``out_channels`` at the input's size,
  [z3', z6', z9', z12'], [attention probabilities of the kept blocks]). With patch 2**s the
  z3' path uses 4 - s stride-2 ConvBlocks (2 at the default patch 4) so that every map lands
  at the right size.
  """
  transformer: Transformer
  decoder_channels: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kept, patch = self.transformer.kept_blocks, self.transformer.patch_size
    if len(kept) != 4:
      raise ValueError(f'model.kept_blocks must name 4 blocks, got {tuple(kept)}')
    levels = int(round(math.log2(patch)))
    if 2 ** levels != patch or not 1 <= levels <= 3:
      raise ValueError(f'model.patch_size must be 2, 4 or 8, got {patch}')
    c0, c1, c2, c3, c4 = self.decoder_channels
    dtype = self.dtype
    hidden, probs, grid = self.transformer(x, train)
    to_map = lambda z: z.reshape((z.shape[0],) + grid + (z.shape[-1],))
    z3, z6, z9, z12 = (to_map(z) for z in hidden)

    # z12': one transposed conv (grid x2).
    z12 = deconv(c0, dtype=dtype, name='decoder12_upsampler')(z12)
    # z9': up x2, fuse with z12', three ConvBlocks, up x2.
    z9 = DeconvBlock(c0, dtype, name='decoder9')(z9, train)
    z9 = jnp.concatenate([z9, z12], axis=-1)
    for i in range(3):
      z9 = ConvBlock(c0, dtype=dtype, name=f'decoder9_upsampler_{i}')(z9, train)
    z9 = deconv(c1, dtype=dtype, name='decoder9_upsampler_3')(z9)
    # z6': up x4, fuse with z9', two ConvBlocks, up x2.
    z6 = DeconvBlock(c0, dtype, name='decoder6_0')(z6, train)
    z6 = DeconvBlock(c1, dtype, name='decoder6_1')(z6, train)
    z6 = jnp.concatenate([z6, z9], axis=-1)
    z6 = ConvBlock(c1, dtype=dtype, name='decoder6_upsampler_0')(z6, train)
    z6 = ConvBlock(c1, dtype=dtype, name='decoder6_upsampler_1')(z6, train)
    z6 = deconv(c2, dtype=dtype, name='decoder6_upsampler_2')(z6)
    # z3': up x8, fuse with z6', (4 - s) stride-2 ConvBlocks, up x2.
    z3 = DeconvBlock(c0, dtype, name='decoder3_0')(z3, train)
    z3 = DeconvBlock(c1, dtype, name='decoder3_1')(z3, train)
    z3 = DeconvBlock(c2, dtype, name='decoder3_2')(z3, train)
    z3 = jnp.concatenate([z3, z6], axis=-1)
    n_down = 4 - levels
    for i in range(n_down):
      z3 = ConvBlock(c2, stride=2, dtype=dtype, name=f'decoder3_upsampler_{i}')(z3, train)
    z3 = deconv(c3, dtype=dtype, name=f'decoder3_upsampler_{n_down}')(z3)
    # z0': two ConvBlocks on the branch's input; fuse with z3' into the output map.
    z0 = ConvBlock(c4, dtype=dtype, name='decoder0_0')(x, train)
    z0 = ConvBlock(c3, dtype=dtype, name='decoder0_1')(z0, train)
    y = jnp.concatenate([z0, z3], axis=-1)
    y = ConvBlock(c3, dtype=dtype, name='decoder0_header_0')(y, train)
    y = ConvBlock(c3, dtype=dtype, name='decoder0_header_1')(y, train)
    y = conv(x.shape[-1], kernel=1, dtype=dtype, name='decoder0_header_2')(y)
    return y, [z3, z6, z9, z12], probs
