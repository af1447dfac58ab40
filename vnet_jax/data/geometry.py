"""RAS geometry: the package's (z, y, x) voxel order and the affines around it.

Volumes are reoriented to RAS with nibabel's `io_orientation` (axis permutations and flips only,
so it is exactly invertible), then transposed to (z, y, x). A case's meta (see
`preprocess.preprocess_arrays`) records the orientation, crop box and grid shapes that
`from_ras_zyx` and `preprocessed_affine` need to go back to the file's voxels or to world mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

_RAS = np.array([[0, 1], [1, 1], [2, 1]], np.float64)
_ZYX_TO_XYZ = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], np.float64)


def to_ras_zyx(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
  """File voxel order -> RAS (x, y, z) -> (z, y, x). Views only (flips and transposes)."""
  return nib.orientations.apply_orientation(arr, ornt).transpose(2, 1, 0)


def from_ras_zyx(arr: np.ndarray, meta: dict) -> np.ndarray:
  """Inverse of `to_ras_zyx`: a (z, y, x) array of the RAS grid -> the file's voxel order."""
  ornt = np.asarray(meta["ornt"], np.float64)
  inv = nib.orientations.ornt_transform(_RAS, ornt)
  out = nib.orientations.apply_orientation(arr.transpose(2, 1, 0), inv)
  if tuple(out.shape) != tuple(meta["original_shape"]):
    raise ValueError(f"mapping back gave shape {out.shape}, expected {meta['original_shape']}")
  return np.ascontiguousarray(out)


def bbox(mask: np.ndarray) -> list[list[int]] | None:
  """[[lo, hi) per axis] of the nonzero voxels; None when there are none."""
  box = []
  for ax in range(3):
    other = tuple(a for a in range(3) if a != ax)
    nz = np.flatnonzero(mask.any(axis=other))
    if nz.size == 0:
      return None
    box.append([int(nz[0]), int(nz[-1]) + 1])
  return box


def preprocessed_affine(meta: dict) -> np.ndarray:
  """Affine from preprocessed (z, y, x) voxel indices to world (RAS+) millimetres."""
  ornt = np.asarray(meta["ornt"], np.float64)
  a = np.asarray(meta["original_affine"], np.float64)
  a = a @ nib.orientations.inv_ornt_aff(ornt, meta["original_shape"]) @ _ZYX_TO_XYZ
  shift = np.eye(4)
  shift[:3, 3] = [lo for lo, _ in meta["crop_box_zyx"]]
  r = np.asarray(meta["cropped_shape_zyx"], np.float64) / np.asarray(meta["resampled_shape"])
  scale = np.diag(list(r) + [1.0])
  scale[:3, 3] = 0.5 * r - 0.5
  return a @ shift @ scale


def ras_zyx(
  affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float]
) -> tuple[tuple[float, ...], tuple[int, ...]]:
  """Spacing and shape in the package's (z, y, x) order of the RAS-reoriented volume."""
  ornt = nib.orientations.io_orientation(affine)
  ras_spacing, ras_shape = [0.0] * 3, [0] * 3
  for i in range(3):
    ras_spacing[int(ornt[i, 0])] = float(spacing[i])
    ras_shape[int(ornt[i, 0])] = int(shape[i])
  return tuple(ras_spacing[::-1]), tuple(ras_shape[::-1])
