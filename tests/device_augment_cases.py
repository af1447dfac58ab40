"""Configurations, patches and runners shared by the tests of the JAX augmentation
(vnet_jax.augment, vnet_jax.augment_spatial, vnet_jax.augment_intensity)."""

import dataclasses

import jax
import numpy as np
from scipy import ndimage

from vnet_jax import augment
from vnet_jax.augment import AugmentConfig

# nnU-Net v2's probabilities and ranges (mirroring on, elastic deformation at a visible strength).
DEFAULTS = AugmentConfig(
  rotation_prob=0.2,
  rotation_range_deg=30.0,
  scaling_prob=0.2,
  scaling_range=(0.7, 1.4),
  elastic_prob=0.0,
  elastic_alpha=2.0,
  elastic_sigma=3.0,
  mirror_prob=0.5,
  mirror_axes=(0, 1, 2),
  noise_prob=0.1,
  noise_variance=(0.0, 0.1),
  blur_prob=0.2,
  blur_sigma=(0.5, 1.0),
  blur_channel_prob=0.5,
  brightness_prob=0.15,
  brightness_range=(0.75, 1.25),
  contrast_prob=0.15,
  contrast_range=(0.75, 1.25),
  lowres_prob=0.25,
  lowres_zoom=(0.5, 1.0),
  lowres_channel_prob=0.5,
  gamma_prob=0.3,
  gamma_range=(0.7, 1.5),
  inverted_gamma_prob=0.1,
)
# Per-sample probabilities (the per-channel ones of blur and low resolution stay as they are).
PROBS = [
  f.name
  for f in dataclasses.fields(AugmentConfig)
  if f.name.endswith("_prob") and not f.name.endswith("_channel_prob")
]
ALL_ON = dataclasses.replace(DEFAULTS, **{**{p: 1.0 for p in PROBS}, "mirror_prob": 0.5})


def only(**kw):
  """DEFAULTS with every probability 0 except those given."""
  return dataclasses.replace(DEFAULTS, **{**{p: 0.0 for p in PROBS}, **kw})


def patch(shape=(6, 8, 10), channels=2, seed=0):
  rng = np.random.default_rng(seed)
  field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
  label = np.zeros(shape, np.int32)
  label[field > 0.05] = 1
  label[field < -0.08] = 3
  image = np.stack([field * (c + 2) + c for c in range(channels)], -1).astype(np.float32)
  return image, label


def run(cfg, image, label, seed=0, anisotropic=False):
  f = jax.jit(augment.augment_sample, static_argnames=("cfg", "anisotropic"))
  out = f(jax.random.key(seed), image, label, cfg=cfg, anisotropic=anisotropic)
  return tuple(np.asarray(o) for o in out)


def run_many(cfg, image, label, n, seed=0, anisotropic=False):
  """n copies of one patch augmented in one vmapped call."""
  images = np.broadcast_to(image, (n, *image.shape))
  labels = np.broadcast_to(label, (n, *label.shape))
  f = jax.jit(augment.augment_batch, static_argnames=("cfg", "anisotropic"))
  out = f(jax.random.key(seed), images, labels, cfg=cfg, anisotropic=anisotropic)
  return tuple(np.asarray(o) for o in out)
