"""The seed's 3D VNet as a Flax linen module: residual blocks, four downsamplings, skip concats."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

Dtype = Any


def _conv2d(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _conv2d_slicewise_kernel_grad(x, w):
  """`_conv2d` whose kernel gradient is summed one image (depth slice) at a time.

  XLA:CPU computes a 2D convolution's kernel gradient as a convolution whose window is a whole
  image, on transposed copies of the input and of the output gradient. An im2col of one slice,
  which stays in cache, and one matrix product per slice give the same sums, and a layer's
  forward + backward 10-15% faster, for 32x32 to 64x64 slices; smaller ones are as fast or
  faster XLA's way (docs/performance.md).
  """
  return _conv2d(x, w)


def _slicewise_fwd(x, w):
  return _conv2d(x, w), (x, w)


def _slicewise_bwd(residuals, dy):
  x, w = residuals
  kh, kw, c, o = w.shape
  _, h, width, _ = x.shape
  dx = jax.vjp(lambda x: _conv2d(x, w), x)[1](dy)[0]
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))

  def add_slice(dw, slices):
    image, grad = slices
    cols = jnp.concatenate(
      [image[a : a + h, b : b + width] for a in range(kh) for b in range(kw)], axis=-1
    )
    return dw + lax.dot_general(
      cols, grad, (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32
    ), None

  dw, _ = lax.scan(add_slice, jnp.zeros((kh * kw * c, o), jnp.float32), (padded, dy))
  return dx, dw.reshape(w.shape).astype(w.dtype)


_conv2d_slicewise_kernel_grad.defvjp(_slicewise_fwd, _slicewise_bwd)

# Slices with fewer voxels keep XLA's own kernel gradient (as fast or faster there).
_SLICEWISE_MIN_VOXELS = 32 * 32


@jax.custom_vjp
def _stored_once(y):
  """y, gathered slice by slice into a buffer of its own: the same values.

  XLA:CPU's fusion recomputes a cheap elementwise result inside every consumer rather than
  storing it. For the depth-tap sum below that meant reading the 3-tap output again in each of
  its 6-8 consumers (BatchNorm's statistics and normalisation, the ReLU, the next padding, the
  gradients); a gather is one of the few operations XLA never duplicates into its consumers
  (an optimization barrier is removed before fusion). 64^3 step: fastest steps 5-8% faster,
  scratch memory 675 -> 541 MB (docs/performance.md). The gradient passes through unchanged.
  """
  return jnp.take(
    y, jnp.arange(y.shape[1]), axis=1, mode="clip", unique_indices=True, indices_are_sorted=True
  )


_stored_once.defvjp(lambda y: (_stored_once(y), None), lambda _, g: (g,))


def depth_split_conv(x, kernel, slicewise_kernel_grad: bool = True):
  """'SAME' 3D convolution as one 2D convolution over depth slices, depth folded into batch.

  The k kernel-depth taps go into the 2D convolution's channels, on whichever side is smaller:
  with fewer input than output channels (the first layer), each slice's input is the channel
  concatenation of its k depth neighbours; otherwise the 2D convolution answers every tap as
  k x O output channels, and output slice d sums tap i's answer of input slice d + i - k//2
  (that sum stored once; the slice-wise kernel gradient where slices have 32x32 voxels or more).
  Same numbers as lax.conv_general_dilated; XLA's CPU backend runs 2D convolutions several times
  faster than 3D ones (docs/performance.md), so this is the CPU formulation.

  `slicewise_kernel_grad=False` keeps XLA's own kernel gradient at every slice size: the same
  sums without a loop, for FLOP counts (XLA's cost analysis counts a loop's body once).
  """
  k, kh, kw, _, o = kernel.shape
  n, d, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0), (0, 0), (0, 0)))
  if c < o:
    stacked = jnp.concatenate([padded[:, i : i + d] for i in range(k)], axis=-1).reshape(
      n * d, h, w, k * c
    )
    taps = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, k * c, o)
    return _conv2d(stacked, taps).reshape(n, d, h, w, o)
  taps = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(kh, kw, c, k * o)
  slicewise = slicewise_kernel_grad and h * w >= _SLICEWISE_MIN_VOXELS
  conv2d = _conv2d_slicewise_kernel_grad if slicewise else _conv2d
  y = conv2d(padded.reshape(n * (d + k - 1), h, w, c), taps).reshape(n, d + k - 1, h, w, k * o)
  return _stored_once(sum(y[:, i : i + d, :, :, i * o : (i + 1) * o] for i in range(k)))


def resolve_conv_impl(impl: str) -> str:
  """'auto' picks the depth-split formulation on CPU and the native 3D convolution elsewhere."""
  if impl == "auto":
    return "depth_split" if jax.default_backend() == "cpu" else "native"
  if impl not in ("native", "depth_split"):
    raise ValueError(f"conv_impl must be 'auto', 'native' or 'depth_split', got {impl!r}")
  return impl


class Down2(nn.Module):
  """2x2x2 stride-2 convolution, written as space-to-depth and one matrix product (no overlap)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, d, h, w, c = x.shape
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (2, 2, 2, c, self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    blocks = x.astype(self.dtype).reshape(n, d // 2, 2, h // 2, 2, w // 2, 2, c)
    y = jnp.einsum("nxaybzcf,abcfo->nxyzo", blocks, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class Up2(nn.Module):
  """2x2x2 stride-2 transposed convolution, written as one matrix product and depth-to-space."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, d, h, w, _ = x.shape
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (2, 2, 2, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    # lax.conv_transpose's convention: output offset a within each 2-block uses kernel[1 - a].
    taps = jnp.transpose(kernel[::-1, ::-1, ::-1], (3, 0, 1, 2, 4)).reshape(-1, 8 * self.features)
    # An explicit (voxels, f) x (f, 8 o) product keeps its result voxel-major. Written as one
    # einsum, XLA:CPU computed it transposed, and every consumer read it 128 KB apart
    # (docs/performance.md).
    y = x.astype(self.dtype).reshape(-1, x.shape[-1]) @ taps.astype(self.dtype)
    y = jnp.transpose(y.reshape(n, d, h, w, 2, 2, 2, self.features), (0, 1, 4, 2, 5, 3, 6, 7))
    return y.reshape(n, 2 * d, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class Conv3D(nn.Module):
  """Stride-1 'SAME' k^3 convolution with nn.Conv's parameters (kernel DHWIO, bias)."""

  features: int
  kernel_size: int = 3
  impl: str = "native"
  dtype: Dtype = jnp.float32
  slicewise_kernel_grad: bool = True  # depth_split only (see depth_split_conv)

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    if k % 2 == 0:
      raise ValueError(f"kernel_size must be odd for 'SAME' padding, got {k}")
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (k, k, k, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if k == 1:
      y = jnp.einsum("ndhwc,co->ndhwo", x, kernel[0, 0, 0])
    elif self.impl == "depth_split":
      y = depth_split_conv(x, kernel, self.slicewise_kernel_grad)
    else:
      y = lax.conv_general_dilated(
        x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
      )
    return y + bias.astype(self.dtype)


class ResidualBlock(nn.Module):
  """Two k^3 convs (+ BatchNorm) with ReLU, the block input added back."""

  features: int
  kernel_size: int = 3
  batch_norm: bool = True
  bn_axis_name: str | None = None
  conv_impl: str = "native"
  dtype: Dtype = jnp.float32
  slicewise_kernel_grad: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k: Conv3D(f, k, self.conv_impl, self.dtype, self.slicewise_kernel_grad)
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = conv(self.features, 1)(x)
    y = x
    for i in range(2):
      y = conv(self.features, self.kernel_size)(y)
      if self.batch_norm:
        y = nn.BatchNorm(
          use_running_average=not train,
          momentum=0.9,
          axis_name=self.bn_axis_name,
          dtype=self.dtype,
          param_dtype=jnp.float32,
        )(y)
      if i == 0:
        y = nn.relu(y)
    return nn.relu(y + shortcut)


class VNet(nn.Module):
  """Encoder filters[0..3] with a filters[4] bottleneck; decoder mirrors the encoder.

  Input (N, D, H, W, in_channels) with D, H, W divisible by 2**(len(filters) - 1);
  output float32 logits (N, D, H, W, num_classes). Softmax belongs to the losses and inference.
  `in_channels` is validated against the input so configs cannot silently disagree with data.

  With `deep_supervision` (nnU-Net's), 1x1x1 heads also read the decoder at 1/2, 1/4, ... of
  the resolution, every decoder level but the coarsest, and the output is the tuple of logits
  from the finest to the coarsest (see `deep_supervision_weights`). The heads' parameters are
  named `ds_head_<i>`, so a model with it off (inference) reads the same parameters and ignores
  them.
  """

  num_classes: int
  in_channels: int = 1
  filters: Sequence[int] = (16, 32, 64, 128, 128)
  kernel_size: int = 3
  batch_norm: bool = True
  dropout_rate: float = 0.1
  downsample: str = "conv"  # "conv" (2x2x2 stride-2 conv) or "maxpool"
  # pmap axis name: synchronises BatchNorm statistics across devices.
  bn_axis_name: str | None = None
  # "native", "depth_split" (fast on CPU) or "auto"; same parameters and numbers.
  conv_impl: str = "auto"
  dtype: Dtype = jnp.float32
  # depth_split only: False traces XLA's own kernel gradients instead of the slice-wise loops
  # (same sums, no loop: what XLA's cost analysis can count; see depth_split_conv).
  slicewise_kernel_grad: bool = True
  deep_supervision: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"VNet expects (N, D, H, W, {self.in_channels}) input, got {x.shape}")
    factor = 2 ** (len(self.filters) - 1)
    if any(s % factor for s in x.shape[1:4]):
      raise ValueError(f"VNet spatial sizes must be divisible by {factor}, got {x.shape[1:4]}")
    if self.downsample not in ("conv", "maxpool"):
      raise ValueError(f"downsample must be 'conv' or 'maxpool', got {self.downsample!r}")
    impl = resolve_conv_impl(self.conv_impl)
    block = lambda f: ResidualBlock(
      f,
      self.kernel_size,
      self.batch_norm,
      self.bn_axis_name,
      impl,
      self.dtype,
      self.slicewise_kernel_grad,
    )
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)

    x = x.astype(self.dtype)
    x = block(self.filters[0])(x, train)
    skips = []
    for features in self.filters[1:]:
      skips.append(x)
      if self.downsample == "conv":
        x = Down2(features, self.dtype)(x)
      else:
        x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
      x = dropout(x)
      x = block(features)(x, train)

    decoded = []  # each decoder level's output, coarsest first
    for features, skip in zip(reversed(self.filters[:-1]), reversed(skips)):
      x = Up2(features, self.dtype)(x)
      x = jnp.concatenate([x, skip], axis=-1)
      x = block(features)(x, train)
      decoded.append(x)
    x = dropout(x)
    logits = Conv3D(self.num_classes, 1, impl, self.dtype)(x).astype(jnp.float32)
    if not self.deep_supervision:
      return logits
    heads = [
      Conv3D(self.num_classes, 1, impl, self.dtype, name=f"ds_head_{i}")(y).astype(jnp.float32)
      for i, y in enumerate(reversed(decoded[1:-1]), 1)
    ]
    return (logits, *heads)


def deep_supervision_weights(num_outputs: int) -> tuple[float, ...]:
  """nnU-Net's loss weights for outputs at scales 1, 1/2, 1/4, ...: 1/2^i, normalised to sum 1
  (the coarsest decoder level, weight 0 in nnU-Net, has no head here)."""
  weights = [0.5**i for i in range(num_outputs)]
  return tuple(w / sum(weights) for w in weights)


def downsample_labels(labels: jax.Array, factor: int) -> jax.Array:
  """(N, D, H, W) labels at 1/factor of the resolution, nearest ("nearest-exact") sampling:
  output voxel j takes input voxel j * factor + factor // 2."""
  start = factor // 2
  return labels[:, start::factor, start::factor, start::factor]


def build_model(
  config: ml_collections.ConfigDict,
  num_classes: int,
  in_channels: int,
  bn_axis_name: str | None = None,
) -> VNet:
  """The VNet a run's config describes (`config.model` and `config.compute_dtype`), with
  deep supervision as configured; `.clone(deep_supervision=False)` gives the inference model."""
  m = config.model
  return VNet(
    num_classes=num_classes,
    in_channels=in_channels,
    filters=tuple(m.filters),
    kernel_size=m.kernel_size,
    batch_norm=m.batch_norm,
    dropout_rate=m.dropout_rate,
    downsample=m.downsample,
    bn_axis_name=bn_axis_name,
    conv_impl=m.conv_impl,
    dtype=jnp.dtype(config.compute_dtype),
    deep_supervision=m.get("deep_supervision", False),  # absent from older runs' configs
  )
