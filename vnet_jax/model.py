"""The seed's 3D VNet as a Flax linen module: residual blocks, four downsamplings, skip concats."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class ResidualBlock(nn.Module):
  """Two k^3 convs (+ BatchNorm) with ReLU, the block input added back."""

  features: int
  kernel_size: int = 3
  batch_norm: bool = True
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k: nn.Conv(f, (k,) * 3, padding="SAME", dtype=self.dtype, param_dtype=jnp.float32)
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = conv(self.features, 1)(x)
    y = x
    for i in range(2):
      y = conv(self.features, self.kernel_size)(y)
      if self.batch_norm:
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name,
                         dtype=self.dtype, param_dtype=jnp.float32)(y)
      if i == 0:
        y = nn.relu(y)
    return nn.relu(y + shortcut)


class VNet(nn.Module):
  """Encoder filters[0..3] with a filters[4] bottleneck; decoder mirrors the encoder.

  Input (N, D, H, W, in_channels) with D, H, W divisible by 2**(len(filters) - 1);
  output float32 logits (N, D, H, W, num_classes). Softmax belongs to the losses and inference.
  `in_channels` is validated against the input so configs cannot silently disagree with data.
  """

  num_classes: int
  in_channels: int = 1
  filters: Sequence[int] = (16, 32, 64, 128, 128)
  kernel_size: int = 3
  batch_norm: bool = True
  dropout_rate: float = 0.1
  downsample: str = "conv"  # "conv" (2x2x2 stride-2 conv) or "maxpool"
  bn_axis_name: str | None = None  # pmap axis name: synchronises BatchNorm statistics across devices
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"VNet expects (N, D, H, W, {self.in_channels}) input, got {x.shape}")
    factor = 2 ** (len(self.filters) - 1)
    if any(s % factor for s in x.shape[1:4]):
      raise ValueError(f"VNet spatial sizes must be divisible by {factor}, got {x.shape[1:4]}")
    if self.downsample not in ("conv", "maxpool"):
      raise ValueError(f"downsample must be 'conv' or 'maxpool', got {self.downsample!r}")
    block = lambda f: ResidualBlock(f, self.kernel_size, self.batch_norm, self.bn_axis_name, self.dtype)
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)

    x = x.astype(self.dtype)
    x = block(self.filters[0])(x, train)
    skips = []
    for features in self.filters[1:]:
      skips.append(x)
      if self.downsample == "conv":
        x = nn.Conv(features, (2, 2, 2), strides=(2, 2, 2), dtype=self.dtype, param_dtype=jnp.float32)(x)
      else:
        x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
      x = dropout(x)
      x = block(features)(x, train)

    for features, skip in zip(reversed(self.filters[:-1]), reversed(skips)):
      x = nn.ConvTranspose(features, (2, 2, 2), strides=(2, 2, 2), dtype=self.dtype, param_dtype=jnp.float32)(x)
      x = jnp.concatenate([x, skip], axis=-1)
      x = block(features)(x, train)
    x = dropout(x)
    logits = nn.Conv(self.num_classes, (1, 1, 1), dtype=self.dtype, param_dtype=jnp.float32)(x)
    return logits.astype(jnp.float32)
