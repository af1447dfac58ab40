"""Trilinear resampling of images and labels between grids that cover the same extent.

Grid convention (used both ways, so mapping back is the exact inverse): voxel j of a grid of
n_out voxels samples the input at coordinate (j + 0.5) * n_in / n_out - 0.5, i.e. both grids
cover the same physical extent (scipy `zoom(grid_mode=True)`, skimage `resize`).

Images: trilinear, not cubic: cubic splines over/undershoot at the sharp air/bone edges of CT
(values outside the clip window), need a float64 prefiltered copy of the volume and are 3-5x
slower, while the gain in sharpness is below the network's resolution. Labels: every class is
interpolated linearly as a one-hot map and the argmax is taken (ties go to the foreground
class). On a synthetic anisotropic case this matched the analytic shapes on the new grid better
than nearest neighbour (Dice 0.95 vs 0.92), at the price of smoothing sub-voxel corners.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

CHUNK_ELEMS = 1 << 23  # output voxels per resampling block: bounds temporaries to ~100 MB


def axis_map(n_in: int, n_out: int):
  """Linear-interpolation indices and weights of one axis; None when the axis is unchanged."""
  if n_in == n_out:
    return None
  s = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  s = np.clip(s, 0.0, n_in - 1)  # edge voxels extend ('nearest' boundary)
  i0 = np.minimum(np.floor(s).astype(np.intp), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, (s - i0).astype(np.float32)


def _axis_range(m, n: int, lo: int, hi: int) -> tuple[int, int]:
  """Output index range whose interpolation support touches input voxels [lo, hi)."""
  if m is None:
    return lo, hi
  i0, i1, _ = m
  return int(np.searchsorted(i1, lo, "left")), int(np.searchsorted(i0, hi - 1, "right"))


def interp_block(
  src: np.ndarray,
  maps,
  out_lo: Sequence[int],
  out_hi: Sequence[int],
  prep: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
  """Trilinear values of the output box [out_lo, out_hi), reading only the input it needs.

  Separable: one 1-D interpolation per axis, shrinking axes first so temporaries stay small.
  `prep` turns the input block into float32 (e.g. a one-hot mask); default: cast.
  """
  in_sl, idx = [], []
  for ax in range(3):
    m = maps[ax]
    if m is None:
      in_sl.append(slice(out_lo[ax], out_hi[ax]))
      idx.append(None)
    else:
      i0, i1, w = (a[out_lo[ax] : out_hi[ax]] for a in m)
      a, b = int(i0[0]), int(i1[-1]) + 1
      in_sl.append(slice(a, b))
      idx.append((i0 - a, i1 - a, w))
  block = src[tuple(in_sl)]
  block = prep(block) if prep is not None else np.asarray(block, np.float32)
  order = sorted(
    (ax for ax in range(3) if idx[ax] is not None), key=lambda ax: len(idx[ax][0]) / block.shape[ax]
  )
  for ax in order:
    i0, i1, w = idx[ax]
    lo = np.take(block, i0, axis=ax)
    hi = np.take(block, i1, axis=ax)
    hi -= lo
    shape = [1, 1, 1]
    shape[ax] = -1
    hi *= w.reshape(shape)
    lo += hi
    block = lo
  return block


def resample_linear(src: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
  """Trilinear resampling of a 3D array to `out_shape` (float32), in bounded-size blocks."""
  out_shape = tuple(int(s) for s in out_shape)
  maps = [axis_map(src.shape[ax], out_shape[ax]) for ax in range(3)]
  out = np.empty(out_shape, np.float32)
  step = max(1, CHUNK_ELEMS // max(1, out_shape[1] * out_shape[2]))
  for z0 in range(0, out_shape[0], step):
    z1 = min(out_shape[0], z0 + step)
    out[z0:z1] = interp_block(src, maps, (z0, 0, 0), (z1,) + out_shape[1:])
  return out


def resample_labels(label: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
  """Per-class linear interpolation of the one-hot map, then argmax (uint8).

  Each class is interpolated only inside its bounding box (the one-hot map is zero elsewhere),
  so the cost is one pass over each organ, not one pass over the volume per class.
  """
  out_shape = tuple(int(s) for s in out_shape)
  if tuple(label.shape) == out_shape:
    return label.astype(np.uint8, copy=True)
  maps = [axis_map(label.shape[ax], out_shape[ax]) for ax in range(3)]
  best = np.zeros(out_shape, np.float32)
  total = np.zeros(out_shape, np.float32)
  arg = np.zeros(out_shape, np.uint8)
  for c, box in enumerate(ndimage.find_objects(label), start=1):
    if box is None:
      continue
    rng = [_axis_range(maps[ax], label.shape[ax], box[ax].start, box[ax].stop) for ax in range(3)]
    if any(hi <= lo for lo, hi in rng):
      continue
    v = interp_block(
      label,
      maps,
      [r[0] for r in rng],
      [r[1] for r in rng],
      prep=lambda b, c=c: (b == c).astype(np.float32),
    )
    region = tuple(slice(lo, hi) for lo, hi in rng)
    b, a = best[region], arg[region]
    upd = v > b
    b[upd] = v[upd]
    a[upd] = c
    total[region] += v
  # Background's interpolated one-hot is 1 - sum of the others; it wins only when larger.
  arg[(1.0 - total) > best + 1e-6] = 0
  return arg


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Nearest-neighbour source index of each output voxel along one axis."""
  if n_in == n_out:
    return np.arange(n_out)
  return np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1)
