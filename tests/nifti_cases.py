"""Tiny CT-like NIfTI cases with a known geometry (neither RAS nor (x, y, z) order, anisotropic),
shared by the preprocessing and cache tests."""

from pathlib import Path

import nibabel as nib
import numpy as np

# Voxel axis 0 -> Left (-x), 0.9 mm; axis 1 -> Superior (+z), 3.0 mm; axis 2 -> Posterior (-y),
# 1.1 mm: neither RAS nor (x, y, z) order, and anisotropic.
AFFINE = np.array(
  [[-0.9, 0, 0, 0.9 * 47 / 2], [0, 0, -1.1, 1.1 * 43 / 2], [0, 3.0, 0, -3.0 * 15 / 2], [0, 0, 0, 1]]
)
SHAPE = (48, 16, 44)
# (z, y, x) mm: finer on every axis, so the round trip loses no information. (Coarser targets
# lose up to a voxel at each boundary: Dice ~0.95 for these 15-30 voxel organs.)
TARGET = (2.0, 1.0, 0.75)


def _world(affine, shape):
  ijk = np.indices(shape).reshape(3, -1).astype(np.float64)
  return (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape((3,) + shape)


def synth(shift=(0.0, 0.0, 0.0), seed=0, nan=False):
  """A smooth CT-like case: a body (40 HU) in air, two ellipsoid organs (30 and 60 HU)."""
  w = _world(AFFINE, SHAPE) - np.asarray(shift)[:, None, None, None]

  def r(radii, centre=(0.0, 0.0, 0.0)):
    return np.sqrt(sum(((w[i] - centre[i]) / radii[i]) ** 2 for i in range(3)))

  label = np.zeros(SHAPE, np.uint8)
  label[r((8.0, 13.0, 16.0), (-9.0, 0.0, 0.0)) < 1] = 1
  label[r((7.0, 10.0, 15.0), (9.0, 2.0, 0.0)) < 1] = 2
  rng = np.random.default_rng(seed)
  body = r((19.0, 20.0, 80.0)) < 1
  image = np.where(body, 40.0, -1000.0) + 30.0 * label + rng.normal(0, 5, SHAPE)
  image = image.astype(np.int16)
  if nan:
    image = image.astype(np.float32)
    image[5, 5, 5] = np.nan
  return image, label


def write(root: Path, case_id: str, image, label, dirs=("images", "labels"), ending=".nii.gz"):
  for d in dirs:
    (root / d).mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(image, AFFINE), str(root / dirs[0] / f"{case_id}_0000{ending}"))
  nib.save(nib.Nifti1Image(label, AFFINE), str(root / dirs[1] / f"{case_id}{ending}"))


def make_case(root: Path, case_id: str, **kw):
  image, label = synth(**kw)
  write(root, case_id, image, label)
  return image, label


def make_flare_like(root: Path) -> dict:
  """Three shifted cases in the FLARE22 layout: {case id: (image, label)}."""
  return {
    f"FLARE22_Tr_{k:04d}": make_case(root, f"FLARE22_Tr_{k:04d}", shift=(k, -k, 2 * k), seed=k)
    for k in range(3)
  }


def dice(a, b):
  return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
