"""Patch augmentations in NumPy, nnU-Net style, applied per patch inside the Grain pipeline.

Images are channels-last float32 `(D, H, W, C)`, labels `(D, H, W)` integer class ids.
Intensity augmentations never touch the label; flips and the spatial transform move image and
label together. Everything is drawn from the `np.random.Generator` Grain gives each patch, so a
patch is a pure function of (seed, patch index) whatever the number of workers.

`AugmentConfig` has no defaults: the values a run uses are the experiment config's
(`vnet_jax/experiments/base.py`, `c.augment`), and `AugmentConfig.none()` turns everything off.
Spatial transforms (rotation, zoom) use scipy's order-1 `affine_transform`, about 0.1 s per
128^3 patch, which dominates a CPU loader when they are on.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities (per patch) and ranges of each augmentation, every field given explicitly."""

  flip_prob: float  # independently per axis in flip_axes
  flip_axes: tuple[int, ...]
  scale_prob: float  # multiplicative brightness: x * f
  scale_range: tuple[float, float]
  contrast_prob: float  # (x - mean) * f + mean, clipped to the patch's original range
  contrast_range: tuple[float, float]
  shift_prob: float  # additive brightness: x + s (units of the normalised intensity)
  shift_range: tuple[float, float]
  noise_prob: float  # additive N(0, variance), variance drawn from noise_variance
  noise_variance: tuple[float, float]
  gamma_prob: float  # ((x - min) / (max - min)) ** g * (max - min) + min
  gamma_range: tuple[float, float]
  rotation_prob: float  # rotation about the patch centre (order 1 image, order 0 label)
  rotation_range_deg: float  # uniform in [-r, r] about each rotated axis
  rotation_in_plane_only: bool  # only about the D axis (for anisotropic spacing)
  scaling_prob: float  # isotropic zoom about the patch centre
  scaling_range: tuple[float, float]  # > 1 zooms in

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if f.name.endswith("_prob") and not 0.0 <= getattr(self, f.name) <= 1.0:
        raise ValueError(f"AugmentConfig.{f.name}={getattr(self, f.name)} is not in [0, 1]")
    for name in (
      "scale_range",
      "contrast_range",
      "shift_range",
      "noise_variance",
      "gamma_range",
      "scaling_range",
    ):
      lo, hi = getattr(self, name)
      if lo > hi:
        raise ValueError(f"AugmentConfig.{name}={getattr(self, name)}: low > high")
    if self.noise_variance[0] < 0 or self.gamma_range[0] <= 0 or self.scaling_range[0] <= 0:
      raise ValueError("AugmentConfig: noise variance must be >= 0, gamma and scaling > 0")

  @classmethod
  def none(cls) -> "AugmentConfig":
    """No augmentation at all: every probability 0 and every range the identity."""
    return cls(
      flip_prob=0.0,
      flip_axes=(),
      scale_prob=0.0,
      scale_range=(1.0, 1.0),
      contrast_prob=0.0,
      contrast_range=(1.0, 1.0),
      shift_prob=0.0,
      shift_range=(0.0, 0.0),
      noise_prob=0.0,
      noise_variance=(0.0, 0.0),
      gamma_prob=0.0,
      gamma_range=(1.0, 1.0),
      rotation_prob=0.0,
      rotation_range_deg=0.0,
      rotation_in_plane_only=False,
      scaling_prob=0.0,
      scaling_range=(1.0, 1.0),
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
      raise ValueError(f"unknown augmentation settings {unknown}; known: {sorted(names)}")
    if missing:
      raise ValueError(f"augmentation settings {missing} missing (no defaults: give every one)")
    # ConfigDict and the command line give lists; the dataclass is frozen and hashable.
    return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()})

  @property
  def spatial(self) -> bool:
    return self.rotation_prob > 0 or self.scaling_prob > 0


def as_config(aug: "AugmentConfig | Mapping[str, Any] | None") -> AugmentConfig:
  """`aug` as an AugmentConfig; None means no augmentation."""
  if aug is None:
    return AugmentConfig.none()
  return aug if isinstance(aug, AugmentConfig) else AugmentConfig.from_dict(aug)


@dataclasses.dataclass(frozen=True)
class SpatialTransform:
  """Output voxel o samples input voxel `matrix @ (o - c_out) + c_in` (centres of the arrays).

  `crop_shape` is the input region (centred on the patch) that covers every sampled voxel.
  """

  matrix: np.ndarray
  crop_shape: tuple[int, int, int]


def _rotation(angles: np.ndarray) -> np.ndarray:
  """Rotation about the D, H and W axes in turn (angles in radians)."""
  mats = []
  for axis, a in enumerate(angles):
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    mats.append(m)
  return mats[0] @ mats[1] @ mats[2]


def sample_spatial(
  rng: np.random.Generator, cfg: AugmentConfig, patch_shape: tuple[int, int, int]
) -> SpatialTransform | None:
  """Draws the rotation/zoom for one patch, or None when neither is applied."""
  if not cfg.spatial:
    return None
  matrix = np.eye(3)
  applied = False
  if cfg.rotation_prob > 0 and rng.random() < cfg.rotation_prob:
    r = math.radians(cfg.rotation_range_deg)
    angles = rng.uniform(-r, r, size=3)
    if cfg.rotation_in_plane_only:
      angles[1:] = 0.0
    matrix = _rotation(angles)
    applied = True
  if cfg.scaling_prob > 0 and rng.random() < cfg.scaling_prob:
    matrix = matrix / rng.uniform(*cfg.scaling_range)  # zoom > 1 samples a smaller region
    applied = True
  if not applied:
    return None
  # Bounding box of the patch mapped into the input, plus one voxel for linear interpolation.
  p = np.asarray(patch_shape, np.float64) - 1
  extent = np.abs(matrix) @ p
  crop = tuple(int(math.ceil(e)) + 2 for e in extent)
  return SpatialTransform(matrix=matrix, crop_shape=crop)


def apply_spatial(
  image: np.ndarray, label: np.ndarray, t: SpatialTransform, patch_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
  """Resamples a crop (any shape, centred on the patch) to `patch_shape`; outside reads 0."""
  c_in = (np.asarray(label.shape, np.float64) - 1) / 2
  c_out = (np.asarray(patch_shape, np.float64) - 1) / 2
  offset = c_in - t.matrix @ c_out
  out = np.empty(tuple(patch_shape) + image.shape[3:], np.float32)
  for c in range(image.shape[3]):
    ndimage.affine_transform(
      image[..., c],
      t.matrix,
      offset=offset,
      output_shape=patch_shape,
      output=out[..., c],
      order=1,
      mode="constant",
      cval=0.0,
    )
  lab = ndimage.affine_transform(
    label, t.matrix, offset=offset, output_shape=patch_shape, order=0, mode="constant", cval=0
  )
  return out, lab


def augment(
  image: np.ndarray,
  label: np.ndarray,
  rng: np.random.Generator,
  cfg: AugmentConfig,
  *,
  inplace: bool = False,
  spatial: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Augments one patch: image `(D, H, W, C)` float, label `(D, H, W)`.

  Returns float32 image and the label (same dtype). With `inplace=True` a float32 image is
  modified in place (the pipeline owns its freshly cropped patch, so this saves a copy); outputs
  may be flipped views. `spatial=False` skips rotation/zoom (the pipeline applies them itself on
  a larger crop so that no zeros enter from outside the patch).
  """
  if image.ndim != 4 or image.shape[:3] != label.shape:
    raise ValueError(f"augment: image {image.shape} and label {label.shape} do not match")
  if inplace and image.dtype == np.float32 and image.flags.writeable:
    x = image
  else:
    x = np.array(image, dtype=np.float32)  # a copy: the caller's array stays as it was
  if spatial:
    t = sample_spatial(rng, cfg, label.shape)
    if t is not None:
      x, label = apply_spatial(x, label, t, label.shape)

  num_channels = x.shape[3]
  channels = [x[..., c] for c in range(num_channels)]
  if cfg.scale_prob > 0 and rng.random() < cfg.scale_prob:
    for ch, f in zip(channels, rng.uniform(*cfg.scale_range, size=num_channels)):
      ch *= np.float32(f)
  if cfg.contrast_prob > 0 and rng.random() < cfg.contrast_prob:
    for ch, f in zip(channels, rng.uniform(*cfg.contrast_range, size=num_channels)):
      lo, hi, mean = ch.min(), ch.max(), ch.mean(dtype=np.float64)
      ch -= np.float32(mean)
      ch *= np.float32(f)
      ch += np.float32(mean)
      np.clip(ch, lo, hi, out=ch)
  if cfg.shift_prob > 0 and rng.random() < cfg.shift_prob:
    for ch, s in zip(channels, rng.uniform(*cfg.shift_range, size=num_channels)):
      ch += np.float32(s)
  if cfg.noise_prob > 0 and rng.random() < cfg.noise_prob:
    std = math.sqrt(rng.uniform(*cfg.noise_variance))
    if std > 0:
      noise = rng.standard_normal(size=x.shape, dtype=np.float32)
      noise *= np.float32(std)
      x += noise
  if cfg.gamma_prob > 0 and rng.random() < cfg.gamma_prob:
    for ch, g in zip(channels, rng.uniform(*cfg.gamma_range, size=num_channels)):
      lo, hi = ch.min(), ch.max()
      span = float(hi) - float(lo)
      if span <= 0:
        continue  # a constant patch has nothing to reshape
      ch -= lo
      ch *= np.float32(1.0 / span)
      np.clip(ch, 0.0, 1.0, out=ch)  # rounding can leave 1 + eps; power must not grow it
      np.power(ch, np.float32(g), out=ch)
      ch *= np.float32(span)
      ch += lo

  # Flips last, as views: the batcher's copy into the batch array makes them contiguous for free.
  axes = tuple(a for a in cfg.flip_axes if cfg.flip_prob > 0 and rng.random() < cfg.flip_prob)
  if axes:
    x = np.flip(x, axes)
    label = np.flip(label, axes)
  return x, label
