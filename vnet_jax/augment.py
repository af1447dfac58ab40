"""Patch augmentation on the accelerator: pure JAX, inside the jitted/pmapped train step.

`augment_sample(key, image, label, cfg)` augments one patch, image `(D, H, W, C)` float32 and
label `(D, H, W)` int; `augment_batch` does a batch, each sample with its own key from
`jax.random.split`. All randomness comes from the key, so a patch is a pure function of it
(the caller derives it from seed, step, device and process). The draws have a fixed layout, so
switching one transform off leaves the draws of the others unchanged.
This module holds the configuration, the draws and the order; the transforms themselves are in
`augment_spatial` and `augment_intensity`.

The set and the order are nnU-Net v2's (`nnUNetTrainer.get_training_transforms`):
1. spatial: rotation x isotropic scaling x optional elastic deformation, composed into one
   sampling grid about the patch centre and applied by ONE resampling (image trilinear, label
   nearest). Output voxels whose source lies outside the patch (more than half a voxel off its
   grid) get image 0 and label -1, "ignore" for the losses (nnU-Net instead crops a larger patch
   and reads background there).
2. Gaussian noise, 3. Gaussian blur, 4. multiplicative brightness, 5. contrast, 6. low-resolution
   simulation, 7. gamma on the inverted image, 8. gamma, 9. mirroring (image and label).
Each is applied to a sample with its own probability; a sample that does not draw a transform
gets its input back exactly (`jnp.where` on the draw: under vmap a `lax.cond` computes both
branches anyway). `augment_batch` skips a transform that no sample of the batch draws (one
`lax.cond` per transform on the batch). Transforms with probability 0 are left out of the trace,
so `AugmentConfig.none()` costs next to nothing.

With `anisotropic=True` (spacing max/min > 3) the spatial transform acts in-plane only, as
nnU-Net's "dummy 2D" augmentation: rotation about the D axis, scaling and elastic displacement of
H and W; low-resolution simulation leaves D alone as well.

Differences from nnU-Net, deliberate: labels are resampled nearest (nnU-Net interpolates one-hot
maps linearly); noise std is sqrt(variance) (nnU-Net uses the drawn "variance" as the std);
a sample's noise field is shared by its channels, as nnU-Net's synchronised noise.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vnet_jax import augment_intensity as intensity
from vnet_jax import augment_spatial as spatial
from vnet_jax.errors import ConfigError

_RANGES = (
  "scaling_range",
  "noise_variance",
  "blur_sigma",
  "brightness_range",
  "contrast_range",
  "lowres_zoom",
  "gamma_range",
)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities (per sample) and ranges of each augmentation, every field given explicitly.

  Frozen and hashable: pass it to `jax.jit` as a static argument (or close over it).
  """

  rotation_prob: float
  rotation_range_deg: float  # uniform in [-r, r] about each axis (D only when anisotropic)
  scaling_prob: float
  scaling_range: tuple[float, float]  # same factor on every axis; > 1 zooms in (objects grow)
  elastic_prob: float
  elastic_alpha: float  # largest displacement, in (output) voxels
  elastic_sigma: float  # Gaussian smoothing of the random displacement field, in voxels
  mirror_prob: float  # independently per axis in mirror_axes
  mirror_axes: tuple[int, ...]
  noise_prob: float  # additive N(0, variance), variance uniform in noise_variance
  noise_variance: tuple[float, float]
  blur_prob: float  # Gaussian blur, sigma uniform per axis and channel
  blur_sigma: tuple[float, float]  # voxels
  blur_channel_prob: float  # each channel of a blurred sample
  brightness_prob: float  # x * f, f per channel
  brightness_range: tuple[float, float]
  contrast_prob: float  # (x - mean) * f + mean, clipped to the channel's range, f per channel
  contrast_range: tuple[float, float]
  lowres_prob: float  # nearest downsampling by a zoom, then linear upsampling, per channel
  lowres_zoom: tuple[float, float]  # in (0, 1]: 0.5 halves the resolution
  lowres_channel_prob: float  # each channel of a sample drawn for low resolution
  gamma_prob: float  # range-normalised x ** g, mean and std kept, g per channel
  gamma_range: tuple[float, float]
  inverted_gamma_prob: float  # the same on -x (then negated back), gamma from gamma_range

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name.endswith("_prob") and not 0.0 <= value <= 1.0:
        raise ConfigError(f"AugmentConfig.{f.name}={value} is not in [0, 1]")
    for name in _RANGES:
      value = getattr(self, name)
      if len(value) != 2 or value[0] > value[1]:
        raise ConfigError(f"AugmentConfig.{name}={value}: not a (low, high) pair")
    if self.rotation_range_deg < 0 or self.elastic_alpha < 0:
      raise ConfigError("AugmentConfig: rotation_range_deg and elastic_alpha must be >= 0")
    if self.scaling_range[0] <= 0 or self.gamma_range[0] <= 0:
      raise ConfigError("AugmentConfig: scaling_range and gamma_range must be > 0")
    if self.noise_variance[0] < 0 or self.blur_sigma[0] < 0:
      raise ConfigError("AugmentConfig: noise_variance and blur_sigma must be >= 0")
    if not 0 < self.lowres_zoom[0] <= self.lowres_zoom[1] <= 1:
      raise ConfigError(f"AugmentConfig.lowres_zoom={self.lowres_zoom} is not within (0, 1]")
    if self.elastic_prob > 0 and self.elastic_sigma <= 0:
      raise ConfigError("AugmentConfig: elastic_sigma must be > 0")
    if not set(self.mirror_axes) <= {0, 1, 2} or len(set(self.mirror_axes)) != len(
      self.mirror_axes
    ):
      raise ConfigError(f"AugmentConfig.mirror_axes={self.mirror_axes}: distinct axes of 0, 1, 2")

  @classmethod
  def none(cls) -> "AugmentConfig":
    """No augmentation at all: every probability 0 and every range the identity."""
    return cls(
      rotation_prob=0.0,
      rotation_range_deg=0.0,
      scaling_prob=0.0,
      scaling_range=(1.0, 1.0),
      elastic_prob=0.0,
      elastic_alpha=0.0,
      elastic_sigma=1.0,
      mirror_prob=0.0,
      mirror_axes=(),
      noise_prob=0.0,
      noise_variance=(0.0, 0.0),
      blur_prob=0.0,
      blur_sigma=(0.0, 0.0),
      blur_channel_prob=0.0,
      brightness_prob=0.0,
      brightness_range=(1.0, 1.0),
      contrast_prob=0.0,
      contrast_range=(1.0, 1.0),
      lowres_prob=0.0,
      lowres_zoom=(1.0, 1.0),
      lowres_channel_prob=0.0,
      gamma_prob=0.0,
      gamma_range=(1.0, 1.0),
      inverted_gamma_prob=0.0,
    )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "AugmentConfig":
    """From a dict or ConfigDict (e.g. `config.augment`) naming every field; ValueError for an
    unknown or a missing one."""
    if hasattr(d, "to_dict"):
      d = d.to_dict()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(d) - names), sorted(names - set(d))
    if unknown:
      raise ConfigError(f"config.augment: unknown settings {unknown}; known: {sorted(names)}")
    if missing:
      raise ConfigError(f"config.augment: settings {missing} missing (no defaults: give every one)")
    # ConfigDict and the command line give lists; the dataclass must stay hashable.
    return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()})


# --------------------------------------------------------------------------------------------
# Drawing and applying


def _about_one(side: jax.Array, u: jax.Array, lo: float, hi: float) -> jax.Array:
  """nnU-Net's BGContrast from two uniforms: when lo < 1 < hi, half the draws uniform in
  [lo, 1], half in [1, hi], so that weakening and strengthening are equally likely; otherwise
  uniform in [lo, hi]."""
  if not lo < 1 < hi:
    return lo + u * (hi - lo)
  return jnp.where(side < 0.5, lo + u * (1 - lo), 1 + u * (hi - 1))


def _num_uniforms(channels: int) -> int:
  return 18 + 14 * channels  # the layout of `draw`


def draw(key: jax.Array, cfg: AugmentConfig, channels: int, anisotropic: bool = False) -> dict:
  """Every random parameter of one sample, from `key` alone.

  All small draws come from one uniform vector in a fixed layout, whatever `cfg` switches on:
  switching a transform off leaves the others' draws unchanged, and one random-bits call is far
  cheaper (to compile and to run) than one per parameter. `*_on` say which transforms apply.
  """
  k_uniform, k_noise, k_elastic = jax.random.split(key, 3)
  u = jax.random.uniform(k_uniform, (_num_uniforms(channels),))
  pos = 0

  def take(*shape):
    nonlocal pos
    n = math.prod(shape)
    pos += n
    return u[pos - n : pos].reshape(shape)

  c = channels
  p = {}
  flags = take(3) < jnp.array([cfg.rotation_prob, cfg.scaling_prob, cfg.elastic_prob])
  rotate, scale, p["elastic_on"] = flags
  p["spatial_on"] = flags.any()
  angles = (2 * take(3) - 1) * math.radians(cfg.rotation_range_deg)
  if anisotropic:
    angles = angles * jnp.array([1.0, 0.0, 0.0])
  p["angles"] = jnp.where(rotate, angles, 0.0)
  lo, hi = cfg.scaling_range
  p["zoom"] = jnp.where(scale, lo + take() * (hi - lo), 1.0)
  p["elastic_key"] = k_elastic

  p["noise_on"] = take() < cfg.noise_prob
  lo, hi = cfg.noise_variance
  p["noise_std"] = jnp.sqrt(lo + take() * (hi - lo))
  p["noise_key"] = k_noise

  on = take() < cfg.blur_prob
  p["blur_on"] = on & (take(c) < cfg.blur_channel_prob)
  lo, hi = cfg.blur_sigma
  p["blur_sigma"] = lo + take(c, 3) * (hi - lo)

  for name, prob, (lo, hi) in (
    ("brightness", cfg.brightness_prob, cfg.brightness_range),
    ("contrast", cfg.contrast_prob, cfg.contrast_range),
  ):
    on = take() < prob
    side = take(c)
    p[name] = _about_one(side, take(c), lo, hi)
    # A factor of 1 is the identity only up to rounding: keep x exactly.
    p[f"{name}_on"] = on & (p[name] != 1)

  on = take() < cfg.lowres_prob
  p["lowres_on"] = on & (take(c) < cfg.lowres_channel_prob)
  lo, hi = cfg.lowres_zoom
  p["lowres_zoom"] = lo + take(c) * (hi - lo)

  for name, prob in (("inverted_gamma", cfg.inverted_gamma_prob), ("gamma", cfg.gamma_prob)):
    on = take() < prob
    side = take(c)
    p[name] = _about_one(side, take(c), *cfg.gamma_range)
    p[f"{name}_on"] = on & (p[name] != 1)

  p["mirror"] = take(3) < cfg.mirror_prob  # per axis 0, 1, 2
  p["mirror_on"] = p["mirror"][jnp.array(cfg.mirror_axes, int)].any()
  assert pos == u.size
  return p


def _spatial(p: dict, image, label, cfg: AugmentConfig, anisotropic: bool):
  matrix = spatial.sampling_matrix(p["angles"], p["zoom"], anisotropic)
  displacement = None
  if cfg.elastic_prob > 0:
    alpha = jnp.where(p["elastic_on"], cfg.elastic_alpha, 0.0)
    displacement = spatial.elastic_displacement(
      p["elastic_key"], label.shape, cfg.elastic_sigma, alpha, anisotropic
    )
  out_image, out_label = spatial.warp(image, label, matrix, displacement)
  on = p["spatial_on"]
  return jnp.where(on, out_image, image), jnp.where(on, out_label, label)


def _stages(cfg: AugmentConfig, anisotropic: bool) -> list:
  """The transforms `cfg` switches on, in order, as (flag, f): `f(p, image, label)` applies one
  to a sample where `p[flag]` (parameters of `draw`) says so and returns its input exactly
  elsewhere. The image is float32 here."""
  stages = []

  def image_only(flag, f):
    stages.append((flag, lambda p, x, y: (jnp.where(p[flag], f(p, x), x), y)))

  if cfg.rotation_prob > 0 or cfg.scaling_prob > 0 or cfg.elastic_prob > 0:
    stages.append(("spatial_on", lambda p, x, y: _spatial(p, x, y, cfg, anisotropic)))
  if cfg.noise_prob > 0:
    image_only("noise_on", lambda p, x: intensity.gaussian_noise(x, p["noise_std"], p["noise_key"]))
  if cfg.blur_prob > 0:
    radius = max(1, math.ceil(3 * cfg.blur_sigma[1]))  # nnU-Net's kernels reach 3 sigma
    image_only("blur_on", lambda p, x: intensity.blur(x, p["blur_sigma"], radius))
  if cfg.brightness_prob > 0:
    image_only("brightness_on", lambda p, x: intensity.brightness(x, p["brightness"]))
  if cfg.contrast_prob > 0:
    image_only("contrast_on", lambda p, x: intensity.contrast(x, p["contrast"]))
  if cfg.lowres_prob > 0:
    axes = (1, 2) if anisotropic else (0, 1, 2)
    image_only("lowres_on", lambda p, x: intensity.low_resolution(x, p["lowres_zoom"], axes))
  if cfg.inverted_gamma_prob > 0:
    image_only(
      "inverted_gamma_on", lambda p, x: intensity.gamma(x, p["inverted_gamma"], invert=True)
    )
  if cfg.gamma_prob > 0:
    image_only("gamma_on", lambda p, x: intensity.gamma(x, p["gamma"]))
  if cfg.mirror_prob > 0 and cfg.mirror_axes:
    stages.append(("mirror_on", lambda p, x, y: spatial.mirror(x, y, p["mirror"], cfg.mirror_axes)))
  return stages


def is_anisotropic(spacing) -> bool:
  """nnU-Net's rule: spacing (z, y, x) whose largest / smallest exceeds 3 rotates in-plane only."""
  return spacing is not None and max(spacing) / min(spacing) > 3


def augment_sample(
  key: jax.Array,
  image: jax.Array,
  label: jax.Array,
  cfg: AugmentConfig,
  anisotropic: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Augments one patch: image `(D, H, W, C)` float, label `(D, H, W)` int (made int32 when
  unsigned, for the -1 of outside voxels). `cfg` and `anisotropic` are static."""
  if image.ndim != 4 or image.shape[:3] != label.shape:
    raise ValueError(f"augment_sample: image {image.shape} and label {label.shape} do not match")
  if not jnp.issubdtype(label.dtype, jnp.signedinteger):
    label = label.astype(jnp.int32)
  p = draw(key, cfg, image.shape[-1], anisotropic)
  x = image.astype(jnp.float32)
  for _, f in _stages(cfg, anisotropic):
    x, label = f(p, x, label)
  return x.astype(image.dtype), label


def augment_batch(
  key: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  cfg: AugmentConfig,
  anisotropic: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """`augment_sample` on each sample of a batch `(B, D, H, W, C)`, `(B, D, H, W)`; sample i uses
  `jax.random.split(key, B)[i]`, and gets what `augment_sample` gives it with that key.

  A transform that no sample of the batch draws is skipped (`lax.cond` on the batch): with
  nnU-Net's probabilities and small batches that is most of them in most steps.
  """
  if images.ndim != 5 or images.shape[:4] != labels.shape:
    raise ValueError(f"augment_batch: images {images.shape} and labels {labels.shape} differ")
  if not jnp.issubdtype(labels.dtype, jnp.signedinteger):
    labels = labels.astype(jnp.int32)
  keys = jax.random.split(key, images.shape[0])
  p = jax.vmap(lambda k: draw(k, cfg, images.shape[-1], anisotropic))(keys)
  x = images.astype(jnp.float32)
  for flag, f in _stages(cfg, anisotropic):
    x, labels = jax.lax.cond(
      jnp.any(p[flag]), lambda xy, f=f: jax.vmap(f)(p, *xy), lambda xy: xy, (x, labels)
    )
  return x.astype(images.dtype), labels
