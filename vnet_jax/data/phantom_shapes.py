"""Shapes drawn in the deformed body coordinates of one synthetic phantom (`phantom.make_case`).

Body-relative "N-space": r is towards the patient's right and a anterior, both in units of the
body's half-width; t runs 0..2 from the bottom to the top slice, over the canonical RAS+ voxel
grid (axis 0 right, 1 anterior, 2 superior). A smooth random deformation of these coordinates,
shared by every structure, bends the organs without tearing them apart from their neighbours;
`Phantom.ellipsoid` and `Phantom.tube` draw masks with irregular surfaces in them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Anterior-posterior positions given to the shapes assume a body half-depth of 0.72 and are
# rescaled to each case's depth (`Phantom.a_scale`).
_REF_DEPTH = 0.72
_T_EXTENT = 2.0


def smooth_field(
  rng: np.random.Generator, shape: Sequence[int], n_ctrl: Sequence[int]
) -> np.ndarray:
  """A smooth random field with unit standard deviation over the whole grid.

  Separable Gaussian-kernel interpolation of a coarse random grid: exact output shape and three
  small matrix products, far cheaper than a spline zoom of the full volume.
  """
  mats = []
  for n, c in zip(shape, n_ctrl):
    x = (np.arange(n) + 0.5) / n
    ctrl = np.linspace(-0.1, 1.1, c)
    w = np.exp(-0.5 * ((x[:, None] - ctrl[None]) / (ctrl[1] - ctrl[0])) ** 2)
    mats.append((w / w.sum(1, keepdims=True)).astype(np.float32))
  coarse = rng.normal(size=tuple(n_ctrl)).astype(np.float32)
  f = np.einsum("ia,jb,kc,abc->ijk", *mats, coarse, optimize=True)
  return (f - f.mean()) / max(float(f.std()), 1e-6)


class Phantom:
  """Deformed body coordinates of one case and the organ masks drawn in them."""

  def __init__(
    self, rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float]
  ):
    self.rng = rng
    self.shape = shape
    nx, ny, nz = shape
    sx, sy, _ = spacing
    # The body fills most of the in-plane field of view, like a CT reconstruction circle.
    self.half_width = rng.uniform(0.82, 0.90) * min(nx * sx, ny * sy) / 2  # mm
    self.depth = rng.uniform(0.66, 0.78)  # AP half-depth / LR half-width
    self.a_scale = self.depth / _REF_DEPTH
    off_x, off_y = rng.uniform(-0.04, 0.04), rng.uniform(-0.06, 0.02)
    self.r_axis = ((np.arange(nx) - (nx - 1) / 2) * sx / self.half_width - off_x).astype(np.float32)
    self.a_axis = ((np.arange(ny) - (ny - 1) / 2) * sy / self.half_width - off_y).astype(np.float32)
    self.t_axis = (((np.arange(nz) + 0.5) / nz) * _T_EXTENT).astype(np.float32)
    # Global elastic-ish deformation of the coordinates: every structure moves together, so
    # organs bend without tearing apart from their neighbours.
    ctrl = (5, 5, 4)
    self.R = self.r_axis[:, None, None] + 0.035 * smooth_field(rng, shape, ctrl)
    self.A = self.a_axis[None, :, None] + 0.030 * smooth_field(rng, shape, ctrl)
    self.T = self.t_axis[None, None, :] + 0.050 * smooth_field(rng, shape, ctrl)
    # Smooth fields that make each organ's surface irregular (mixed with per-organ weights).
    self.noise = [smooth_field(rng, shape, (8, 8, 7)) for _ in range(3)]

  # Crops keep the organ computations to a small box around each organ.
  def _crop(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
    # The box is in undeformed coordinates: widen it by over four s.d. of the deformation.
    margin = (0.15, 0.15, 0.22)
    out = []
    for axis, low, h, m in zip((self.r_axis, self.a_axis, self.t_axis), lo, hi, margin):
      i0 = int(np.searchsorted(axis, low - m))
      i1 = int(np.searchsorted(axis, h + m))
      out.append(slice(max(i0 - 1, 0), min(i1 + 1, len(axis))))
    return tuple(out)

  def _surface_noise(self, sl: tuple[slice, ...], amp: float) -> np.ndarray:
    w = self.rng.normal(size=3)
    w /= np.linalg.norm(w)
    return amp * sum(wi * n[sl] for wi, n in zip(w, self.noise))

  def _place(self, sl, crop_mask) -> np.ndarray:
    mask = np.zeros(self.shape, bool)
    mask[sl] = crop_mask
    return mask

  def ellipsoid(self, center, semi, rot_deg=0.0, tilt_deg=0.0, amp=0.12, jitter=True) -> np.ndarray:
    """Rotated (about t), tilted (in the r-t plane) ellipsoid with an irregular surface."""
    c = np.array(center, float) * (1, self.a_scale, 1)
    semi = np.array(semi, float)
    if jitter:
      c += self.rng.normal(0, (0.02, 0.02, 0.035))
      semi *= self.rng.uniform(0.9, 1.1, 3)
      rot_deg += self.rng.normal(0, 6)
    reach = semi.max() * (1 + 4 * amp)  # the surface noise can push the surface outwards
    sl = self._crop(c - reach, c + reach)
    dr, da, dt = self.R[sl] - c[0], self.A[sl] - c[1], self.T[sl] - c[2]
    th, ph = np.deg2rad(rot_deg), np.deg2rad(tilt_deg)
    u = np.cos(th) * dr + np.sin(th) * da
    v = -np.sin(th) * dr + np.cos(th) * da
    u, w = np.cos(ph) * u + np.sin(ph) * dt, -np.sin(ph) * u + np.cos(ph) * dt
    level = np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (w / semi[2]) ** 2)
    return self._place(sl, level < 1 + self._surface_noise(sl, amp))

  def tube(self, points, radii, amp=0.08, jitter=True) -> np.ndarray:
    """Tube of varying radius along a polyline (union of densely spaced spheres)."""
    p = np.array(points, float) * (1, self.a_scale, 1)
    r = np.array(radii, float)
    if jitter:
      p += self.rng.normal(0, (0.015, 0.015, 0.025), p.shape)
      r = r * self.rng.uniform(0.9, 1.1)
    centers, rads = [p[:1]], [r[:1]]
    for i in range(len(p) - 1):
      n = int(np.ceil(np.linalg.norm(p[i + 1] - p[i]) / (min(r[i], r[i + 1]) / 3)))
      f = np.linspace(0, 1, n + 1)[1:, None]
      centers.append(p[i] + f * (p[i + 1] - p[i]))
      rads.append(r[i] + f[:, 0] * (r[i + 1] - r[i]))
    centers, rads = np.concatenate(centers), np.concatenate(rads)
    reach = rads.max() * (1 + 4 * amp)
    sl = self._crop(centers.min(0) - reach, centers.max(0) + reach)
    R, A, T = self.R[sl], self.A[sl], self.T[sl]
    level = np.full(R.shape, np.inf, np.float32)
    for (cr, ca, ct), rad in zip(centers, rads):
      np.minimum(level, np.sqrt((R - cr) ** 2 + (A - ca) ** 2 + (T - ct) ** 2) / rad, out=level)
    return self._place(sl, level < 1 + self._surface_noise(sl, amp))

  def centroid(self, mask: np.ndarray) -> tuple[float, float, float]:
    """The (r, a, t) of a mask's centre, a in reference N-space: ready for `ellipsoid`."""
    idx = np.argwhere(mask).mean(0).astype(int)
    # Back to reference N-space (ellipsoid() rescales a by the case's depth again).
    return (
      float(self.r_axis[idx[0]]),
      float(self.a_axis[idx[1]]) / self.a_scale,
      float(self.t_axis[idx[2]]),
    )
