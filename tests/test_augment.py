"""Patch augmentations: label/image consistency, probabilities, ranges, config parsing."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from vnet_jax.data import augment as aug_lib
from vnet_jax.data.augment import AugmentConfig
from vnet_jax.experiments import base

SHAPE = (12, 16, 20)
# nnU-Net v2's ranges: with `_only`, a test switches on one augmentation at its usual strength.
RANGES = dict(
  flip_axes=(0, 1, 2),
  scale_range=(0.75, 1.25),
  contrast_range=(0.75, 1.25),
  shift_range=(-0.1, 0.1),
  noise_variance=(0.0, 0.1),
  gamma_range=(0.7, 1.5),
  rotation_range_deg=30.0,
  scaling_range=(0.7, 1.4),
)
ALL_ON = AugmentConfig(
  **RANGES,
  flip_prob=0.5,
  scale_prob=1.0,
  contrast_prob=1.0,
  shift_prob=1.0,
  noise_prob=1.0,
  gamma_prob=1.0,
  rotation_prob=1.0,
  rotation_in_plane_only=False,
  scaling_prob=1.0,
)


def _patch(seed=0, channels=1):
  rng = np.random.default_rng(seed)
  field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 2)
  label = np.zeros(SHAPE, np.uint8)
  label[field > 0.05] = 1
  label[field < -0.08] = 2
  image = np.stack([field * (c + 1) + c for c in range(channels)], -1).astype(np.float32)
  return image, label


def _only(**kw):
  return dataclasses.replace(AugmentConfig.none(), **{**RANGES, **kw})


def test_none_leaves_data_unchanged_and_input_untouched():
  image, label = _patch(channels=2)
  image0, label0 = image.copy(), label.copy()
  for seed in range(5):
    out_img, out_lab = aug_lib.augment(
      image, label, np.random.default_rng(seed), AugmentConfig.none()
    )
    np.testing.assert_array_equal(out_img, image0)
    np.testing.assert_array_equal(out_lab, label0)
    assert out_img.dtype == np.float32
  # Every augmentation on, not in place: the caller's arrays must not change.
  for seed in range(5):
    out_img, _ = aug_lib.augment(image, label, np.random.default_rng(seed), ALL_ON)
    assert not np.allclose(out_img, image0)
  np.testing.assert_array_equal(image, image0)
  np.testing.assert_array_equal(label, label0)


def test_flips_move_image_and_label_together():
  image, label = _patch()
  image[..., 0] = label * 10.0 + np.arange(np.prod(SHAPE)).reshape(SHAPE) * 1e-4
  seen_axes = set()
  for seed in range(12):
    out_img, out_lab = aug_lib.augment(
      image, label, np.random.default_rng(seed), _only(flip_prob=0.5)
    )
    # The label is recoverable from the image voxel by voxel only if both moved the same way.
    np.testing.assert_array_equal(np.floor(out_img[..., 0] / 10.0 + 1e-3).astype(np.uint8), out_lab)
    # The ramp makes every voxel unique: find which flip the image got; the label got the same.
    for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
      if np.array_equal(out_img, np.flip(image, axes)):
        np.testing.assert_array_equal(out_lab, np.flip(label, axes))
        seen_axes.add(axes)
        break
    else:
      pytest.fail("output is not a flip of the input")
  assert len(seen_axes) > 2  # p=0.5 per axis: several combinations in 12 draws


def test_intensity_augs_keep_labels_and_change_image():
  image, label = _patch(channels=2)
  cfg = _only(
    scale_prob=1.0,
    contrast_prob=1.0,
    shift_prob=1.0,
    noise_prob=1.0,
    noise_variance=(0.01, 0.1),
    gamma_prob=1.0,
  )
  for seed in range(4):
    out_img, out_lab = aug_lib.augment(image, label, np.random.default_rng(seed), cfg)
    np.testing.assert_array_equal(out_lab, label)
    assert out_img.dtype == np.float32 and out_img.shape == image.shape
    assert not np.allclose(out_img, image)
    assert np.isfinite(out_img).all()


def test_scale_is_multiplicative_within_range():
  image, label = _patch()
  image += 3.0  # away from 0 so the ratio is well defined
  out, _ = aug_lib.augment(image, label, np.random.default_rng(1), _only(scale_prob=1.0))
  ratio = out / image
  np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
  assert 0.75 <= ratio.flat[0] <= 1.25 and ratio.flat[0] != 1.0


def test_gamma_preserves_range_and_order():
  image, label = _patch(channels=2)
  cfg = _only(gamma_prob=1.0)
  changed = 0
  for seed in range(4):
    out, _ = aug_lib.augment(image, label, np.random.default_rng(seed), cfg)
    for c in range(2):
      x, y = image[..., c].ravel(), out[..., c].ravel()
      span = x.max() - x.min()
      assert abs(y.min() - x.min()) <= 1e-5 * span
      assert abs(y.max() - x.max()) <= 1e-5 * span
      order = np.argsort(x, kind="stable")
      assert np.all(np.diff(y[order]) >= -1e-5 * span)  # monotone map
      changed += not np.allclose(x, y, atol=1e-4 * span)
  assert changed >= 6


def test_noise_is_additive_and_zero_mean():
  image, label = _patch()
  out, out_lab = aug_lib.augment(
    image, label, np.random.default_rng(0), _only(noise_prob=1.0, noise_variance=(0.04, 0.04))
  )
  diff = (out - image).ravel()
  assert abs(diff.mean()) < 0.02 and abs(diff.std() - 0.2) < 0.02
  np.testing.assert_array_equal(out_lab, label)


def test_apply_spatial_identity_is_the_centre_crop():
  image, label = _patch(channels=2)
  t = aug_lib.SpatialTransform(matrix=np.eye(3), crop_shape=SHAPE)
  patch = (8, 10, 12)
  out_img, out_lab = aug_lib.apply_spatial(image, label, t, patch)
  sl = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(SHAPE, patch))
  np.testing.assert_allclose(out_img, image[sl], atol=1e-6)
  np.testing.assert_array_equal(out_lab, label[sl])


def test_rotation_and_scaling_keep_label_values_and_shapes():
  image, label = _patch()
  cfg = _only(rotation_prob=1.0, scaling_prob=1.0)
  rng = np.random.default_rng(3)
  t = aug_lib.sample_spatial(rng, cfg, (8, 8, 8))
  assert t is not None and all(c >= 8 for c in t.crop_shape)
  out_img, out_lab = aug_lib.augment(image, label, rng, cfg)
  assert out_img.shape == image.shape and out_img.dtype == np.float32
  assert out_lab.shape == label.shape and out_lab.dtype == label.dtype
  assert set(np.unique(out_lab)) <= set(np.unique(label))  # nearest neighbour: no new classes
  assert not np.array_equal(out_lab, label)


def test_config_from_dict_and_validation():
  d = dataclasses.asdict(ALL_ON) | {"gamma_range": [0.8, 1.2], "flip_axes": [0, 2]}
  cfg = AugmentConfig.from_dict(d)
  assert cfg.gamma_range == (0.8, 1.2) and cfg.flip_axes == (0, 2) and cfg.shift_prob == 1.0
  hash(cfg)  # frozen and hashable, lists turned into tuples
  with pytest.raises(ValueError, match="unknown"):
    AugmentConfig.from_dict(d | {"flip_probability": 0.5})
  with pytest.raises(ValueError, match=r"\['gamma_range'\] missing"):
    AugmentConfig.from_dict({k: v for k, v in d.items() if k != "gamma_range"})
  with pytest.raises(TypeError):
    AugmentConfig(flip_prob=0.5)  # no defaults: every field is given
  with pytest.raises(ValueError):
    dataclasses.replace(ALL_ON, flip_prob=1.5)
  with pytest.raises(ValueError, match="low > high"):
    dataclasses.replace(ALL_ON, scale_range=(1.2, 0.8))
  none = AugmentConfig.none()
  assert aug_lib.as_config(None) == none and aug_lib.as_config(d) == cfg
  assert not none.spatial
  assert all(
    getattr(none, f.name) == 0 for f in dataclasses.fields(none) if f.name.endswith("_prob")
  )


def test_experiment_config_names_every_field():
  # The one place with values: the experiment config. Mirroring stays off there because
  # FLARE22 labels kidneys and adrenal glands by side.
  cfg = AugmentConfig.from_dict(base.get_config().augment)
  assert cfg.flip_prob == 0.0
  assert cfg.gamma_prob > 0 and cfg.gamma_range[0] < 1 < cfg.gamma_range[1]
