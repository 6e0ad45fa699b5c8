"""MST-KDNet: the encoder-decoder used for both teacher and student (docs/method.md, "Network").

Input (N, H, W, D, 4) with H, W, D multiples of 8 * patch_size (32 at the defaults). Shapes
below are for 160x192x128 and init_channels c = 16:

  c1      conv3 4->c, ResBlock                                  (160,192,128,16)
  c2      conv3 s2 c->2c, ResBlock x2                           (80,96,64,32)
  c2d     conv3 s2 2c->4c; c2d_p = maxpool2(c2d)                (40,48,32,64), (20,24,16,64)
  c3      ResBlock x2 on c2d                                    (40,48,32,64)
  c3d     conv3 s2 4c->8c                                       (20,24,16,128)
  t       UNETR(c3d) + c3d                                      (20,24,16,128)
  content ResBlock x4 on t                                      (20,24,16,128)
  style   1x1 conv on [c2d_p, c3d, t] (20c -> 8c)               (20,24,16,128)
  fused   1x1 conv on [style, content] (16c -> 8c), dropout 0.2 (20,24,16,128)
  decoder 1x1 conv, upsample x2, + skip, ResBlock (three times) (160,192,128,16)
  logits  1x1 conv c -> 4; probs = sigmoid(logits)              (160,192,128,4)
"""

from typing import Any, List

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mstkd_jax.models.layers import ResBlock, conv, maxpool2, upsample2
from mstkd_jax.models.transformer import Transformer, UNETRBranch

Dtype = Any


@flax.struct.dataclass
class NetworkOutputs:
  """Everything the losses need from one network pass (shapes at the default size).

  logits, probs: (N, 160, 192, 128, 4) float32.
  style, content, c3d: (N, 20, 24, 16, 128).
  attention: kept blocks' attention probabilities, 4 x (N, heads, T, T), T = 120.
  features: decoded multi-scale transformer maps [z3', z6', z9', z12'].
  """
  logits: jax.Array
  probs: jax.Array
  style: jax.Array
  content: jax.Array
  c3d: jax.Array
  attention: List[jax.Array]
  features: List[jax.Array]


class MSTKDNet(nn.Module):
  """The teacher / student network. ``__call__(x, train)`` returns :class:`NetworkOutputs`."""
  in_channels: int = 4
  num_classes: int = 4
  init_channels: int = 16
  groups: int = 8
  fused_dropout: float = 0.2
  embed_dim: int = 768
  num_heads: int = 12
  num_layers: int = 12
  mlp_dim: int = 2048
  patch_size: int = 4
  kept_blocks: tuple = (3, 6, 9, 12)
  decoder_channels: tuple = (512, 256, 128, 64, 32)
  dropout: float = 0.1
  attention_dropout: float = 0.1
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool) -> NetworkOutputs:
    c, dtype = self.init_channels, self.dtype
    multiple = 8 * self.patch_size
    if x.ndim != 5 or x.shape[-1] != self.in_channels or any(s % multiple for s in x.shape[1:4]):
      raise ValueError(f'MSTKDNet expects (N, H, W, D, {self.in_channels}) with H, W, D '
                       f'multiples of {multiple} (8 x patch_size); got {x.shape}')
    res = nn.remat(ResBlock) if self.remat else ResBlock
    block = lambda name: res(self.groups, dtype, name=name)
    x = x.astype(dtype)

    c1 = block('conv1b')(conv(c, dtype=dtype, name='conv1a')(x))
    c2 = conv(2 * c, stride=2, dtype=dtype, name='ds1')(c1)
    c2 = block('conv2b')(block('conv2a')(c2))
    c2d = conv(4 * c, stride=2, dtype=dtype, name='ds2')(c2)
    c2d_p = maxpool2(c2d)
    c3 = block('conv3b')(block('conv3a')(c2d))
    c3d = conv(8 * c, stride=2, dtype=dtype, name='ds3')(c3)

    transformer = Transformer(
        self.embed_dim, self.num_heads, self.num_layers, self.mlp_dim, self.patch_size,
        tuple(self.kept_blocks), self.dropout, self.attention_dropout, self.remat, dtype,
        parent=None)  # unbound: UNETRBranch adopts it as its 'transformer'
    branch = UNETRBranch(transformer, tuple(self.decoder_channels), dtype, name='Unetr')
    t, features, attention = branch(c3d, train)
    t = t + c3d

    content = t
    for name in ('conv4a', 'conv4b', 'conv4c', 'conv4d'):
      content = block(name)(content)
    style = conv(8 * c, kernel=1, dtype=dtype, name='convc')(
        jnp.concatenate([c2d_p, c3d, t], axis=-1))
    fused = conv(8 * c, kernel=1, dtype=dtype, name='convco')(
        jnp.concatenate([style, content], axis=-1))
    fused = nn.Dropout(self.fused_dropout)(fused, deterministic=not train)

    u = upsample2(conv(4 * c, kernel=1, dtype=dtype, name='up4conva')(fused)) + c3
    u = block('up4convb')(u)
    u = upsample2(conv(2 * c, kernel=1, dtype=dtype, name='up3conva')(u)) + c2
    u = block('up3convb')(u)
    u = upsample2(conv(c, kernel=1, dtype=dtype, name='up2conva')(u)) + c1
    u = block('up2convb')(u)
    logits = conv(self.num_classes, kernel=1, dtype=dtype, name='up1conv')(u).astype(jnp.float32)
    return NetworkOutputs(logits=logits, probs=jax.nn.sigmoid(logits), style=style,
                          content=content, c3d=c3d, attention=attention, features=features)


def network_from_config(config) -> MSTKDNet:
  """Builds the network from ``config.model`` (+ ``config.dtype``, ``config.remat``)."""
  m = config.model
  return MSTKDNet(
      in_channels=m.in_channels, num_classes=m.num_classes, init_channels=m.init_channels,
      groups=m.groups, fused_dropout=m.fused_dropout, embed_dim=m.embed_dim,
      num_heads=m.num_heads, num_layers=m.num_layers, mlp_dim=m.mlp_dim,
      patch_size=m.patch_size, kept_blocks=tuple(m.kept_blocks),
      decoder_channels=tuple(m.decoder_channels), dropout=m.dropout,
      attention_dropout=m.attention_dropout, remat=bool(config.remat),
      dtype=jnp.dtype(config.dtype))
