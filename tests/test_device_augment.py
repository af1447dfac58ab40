"""JAX augmentation, the entry points (vnet_jax.augment): identities, keys, the draws,
probabilities, config parsing. The transforms: test_device_augment_spatial.py and
test_device_augment_intensity.py."""

import dataclasses
import functools
import math

import jax
import numpy as np
import pytest

from tests.device_augment_cases import ALL_ON, DEFAULTS, PROBS, only, patch, run, run_many
from vnet_jax import augment as aug
from vnet_jax.augment import AugmentConfig

# ------------------------------------------------------------------------------------------------
# Identities


def test_none_is_the_identity():
  image, label = patch()
  for seed in range(3):
    out_image, out_label = run(AugmentConfig.none(), image, label, seed)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)
  jaxpr = jax.make_jaxpr(functools.partial(aug.augment_sample, cfg=AugmentConfig.none()))(
    jax.random.key(0), image, label
  )
  assert not any(e.primitive.name in ("gather", "dot_general") for e in jaxpr.eqns)


def test_identity_ranges_with_every_probability_one_are_exact():
  identity = dataclasses.replace(
    AugmentConfig.none(),
    **{**{p: 1.0 for p in PROBS}, "mirror_prob": 0.0, "elastic_sigma": 2.0},
  )
  image, label = patch(channels=2)
  for anisotropic in (False, True):
    out_image, out_label = run(identity, image, label, seed=4, anisotropic=anisotropic)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)


# ------------------------------------------------------------------------------------------------
# Keys and draws


def test_a_patch_is_a_pure_function_of_its_key():
  image, label = patch()
  a = run(ALL_ON, image, label, seed=7)
  b = run(ALL_ON, image, label, seed=7)
  c = run(ALL_ON, image, label, seed=8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["all_on", "defaults"])
def test_batch_gives_each_sample_its_own_key(which):
  # With the defaults most transforms are drawn by no sample of a batch, and skipped.
  cfg = ALL_ON if which == "all_on" else DEFAULTS
  image, label = patch()
  batch = jax.jit(functools.partial(aug.augment_batch, cfg=cfg))
  one = jax.jit(functools.partial(aug.augment_sample, cfg=cfg))
  for seed in range(1 if which == "all_on" else 4):
    key = jax.random.key(seed)
    images, labels = batch(key, np.stack([image] * 3), np.stack([label] * 3))
    if which == "all_on":
      assert not np.array_equal(images[0], images[1])
      assert not np.array_equal(images[1], images[2])
    for i, k in enumerate(jax.random.split(key, 3)):
      one_image, one_label = one(k, image, label)
      np.testing.assert_allclose(images[i], one_image, rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(labels[i], one_label)


def test_unsigned_labels_become_int32_for_the_ignore_value():
  image, label = patch()
  cfg = only(scaling_prob=1.0, scaling_range=(0.7, 0.7))
  _, out_label = run(cfg, image, label.astype(np.uint8))
  assert out_label.dtype == np.int32 and (out_label == -1).any()
  _, out_labels = run_many(cfg, image, label.astype(np.uint8), 2)
  assert out_labels.dtype == np.int32 and (out_labels == -1).any()


def test_switching_one_transform_off_keeps_the_others_draws():
  image, label = patch()
  both = run(only(brightness_prob=1.0, gamma_prob=1.0), image, label, seed=5)[0]
  # With the same key, brightness alone and then gamma alone draw what the pair drew.
  bright = run(only(brightness_prob=1.0), image, label, seed=5)[0]
  again = run(only(gamma_prob=1.0), bright, label, seed=5)[0]
  assert not np.array_equal(bright, image) and not np.array_equal(again, bright)
  np.testing.assert_allclose(both, again, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_under_pmap():
  image, label = patch()
  n = jax.local_device_count()
  images = np.broadcast_to(image, (n, 2, *image.shape))
  labels = np.broadcast_to(label, (n, 2, *label.shape))
  keys = jax.random.split(jax.random.key(0), n)
  f = jax.pmap(lambda k, x, y: aug.augment_batch(k, x, y, ALL_ON))
  out_images, out_labels = f(keys, images, labels)
  assert out_images.shape == images.shape and out_labels.shape == labels.shape
  assert np.isfinite(np.asarray(out_images)).all()


def test_draws_about_one_are_balanced():
  u = np.asarray(aug._about_one(*jax.random.uniform(jax.random.key(0), (2, 20000)), 0.7, 1.5))
  assert u.min() >= 0.7 and u.max() <= 1.5
  assert abs((u < 1).mean() - 0.5) < 0.02  # half below 1 (plain uniform: 3/8)
  u = np.asarray(aug._about_one(*jax.random.uniform(jax.random.key(0), (2, 10)), 1.2, 1.2))
  np.testing.assert_array_equal(u, np.float32(1.2))


# ------------------------------------------------------------------------------------------------
# Probabilities: the fraction of changed samples over many tiny ones in one vmapped call

N = 2000
# (transform on alone at its nnU-Net probability, with ranges that always change the patch;
#  expected fraction of changed samples)
RATES = {
  "rotation": (only(rotation_prob=0.2, rotation_range_deg=30.0), 0.2),
  "scaling": (only(scaling_prob=0.2, scaling_range=(1.2, 1.4)), 0.2),
  "noise": (only(noise_prob=0.1, noise_variance=(0.01, 0.1)), 0.1),
  "blur": (only(blur_prob=0.2), 0.2 * (1 - 0.5**2)),  # two channels, each with p 0.5
  "brightness": (only(brightness_prob=0.15, brightness_range=(1.1, 1.25)), 0.15),
  "contrast": (only(contrast_prob=0.15, contrast_range=(1.1, 1.25)), 0.15),
  "lowres": (only(lowres_prob=0.25, lowres_zoom=(0.5, 0.7)), 0.25 * (1 - 0.5**2)),
  "gamma": (only(gamma_prob=0.3, gamma_range=(1.2, 1.5)), 0.3),
  "inverted_gamma": (only(inverted_gamma_prob=0.1, gamma_range=(1.2, 1.5)), 0.1),
  "mirror": (only(mirror_prob=0.5, mirror_axes=(1,)), 0.5),
}


@pytest.mark.parametrize("name", sorted(RATES))
def test_each_transform_fires_at_its_probability(name):
  cfg, rate = RATES[name]
  image, label = patch(shape=(4, 6, 6), channels=2, seed=9)
  images, labels = run_many(cfg, image, label, N, seed=11)
  changed = (images != image).reshape(N, -1).any(1)
  tolerance = 4 * math.sqrt(rate * (1 - rate) / N)
  assert abs(changed.mean() - rate) < tolerance, (changed.mean(), rate)
  if name not in ("rotation", "scaling", "mirror"):
    np.testing.assert_array_equal(labels, np.broadcast_to(label, labels.shape))


# ------------------------------------------------------------------------------------------------
# Config


def test_config_from_dict_and_validation():
  d = dataclasses.asdict(DEFAULTS)
  d["scaling_range"] = list(d["scaling_range"])  # ConfigDict and flags give lists
  cfg = AugmentConfig.from_dict(d)
  assert cfg == DEFAULTS and hash(cfg) == hash(DEFAULTS)
  with pytest.raises(ValueError, match="missing"):
    AugmentConfig.from_dict({k: v for k, v in d.items() if k != "gamma_prob"})
  with pytest.raises(ValueError, match="unknown"):
    AugmentConfig.from_dict({**d, "flip_prob": 0.5})
  for bad in (
    dict(noise_prob=1.5),
    dict(scaling_range=(1.4, 0.7)),
    dict(gamma_range=(0.0, 1.5)),
    dict(lowres_zoom=(0.5, 1.5)),
    dict(mirror_axes=(0, 3)),
    dict(elastic_prob=0.1, elastic_sigma=0.0),
  ):
    with pytest.raises(ValueError):
      dataclasses.replace(DEFAULTS, **bad)
