r"""FLARE22-like synthetic abdominal CT, so that everything runs without downloading data.

  python -m vnet_jax.data.synthetic --out=data/synthetic --cases=20 [--layout=flare22|nnunet]
      [--seed=0] [--size=X,Y,Z] [--spacing=X,Y,Z]

Each case is a phantom: air, a body outline whose cross-section changes along z, subcutaneous
fat, an abdominal muscle wall, spine (vertebral bodies, discs, posterior arch), paraspinal and
psoas muscles, ribs and lung bases at the top, bowel loops with gas at the bottom, and the 13
FLARE22 organs as randomly deformed ellipsoids and tubes with organ-specific Hounsfield units,
Gaussian noise and a little partial-volume blur. Labels and HU follow FLARE22 (int16 images,
uint8 labels, ids 1..13).

Scale: by default the volume is small enough to train on a CPU (96-128 voxels in-plane at
0.7-0.9 mm, 24-48 slices at 2.5-5 mm), so the phantom is a scaled-down abdomen (about 80 mm
wide, 120 mm long) rather than a life-size one; anatomy is laid out in body-relative coordinates,
so a larger `size` gives a larger, finer phantom with the same layout. Small organs (adrenals,
esophagus, gallbladder, pancreas) are drawn larger than life and in consistent places, so that
a tiny model trained for minutes can learn them.

Orientation: the anatomy is generated in a canonical RAS+ voxel grid (axis 0 towards the
patient's right, 1 anterior, 2 superior), then each case is stored in one of several orientations
(RAS, LPS, LAS, LPI and two axis permutations) with the voxel array and the affine changed
together, so `nibabel.as_closest_canonical` recovers the same anatomy for every case.

`size` and `spacing` are in NIfTI voxel order (x, y, z) of that canonical grid: the shape of the
array `make_case` returns, not the package's (D, H, W).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from vnet_jax.data.layouts import FLARE22_CLASSES
from vnet_jax.errors import DataError

LAYOUTS = ("flare22", "nnunet")

# The label ids of layouts.FLARE22_CLASSES.
(
  LIVER,
  RIGHT_KIDNEY,
  SPLEEN,
  PANCREAS,
  AORTA,
  IVC,
  RIGHT_ADRENAL,
  LEFT_ADRENAL,
  GALLBLADDER,
  ESOPHAGUS,
  STOMACH,
  DUODENUM,
  LEFT_KIDNEY,
) = range(1, 14)
NUM_ORGANS = 13

# Mean HU of each organ in a portal-venous-like phase; a case jitters these a little.
ORGAN_HU = {
  LIVER: 60,
  RIGHT_KIDNEY: 150,
  SPLEEN: 50,
  PANCREAS: 45,
  AORTA: 200,
  IVC: 120,
  RIGHT_ADRENAL: 35,
  LEFT_ADRENAL: 35,
  GALLBLADDER: 10,
  ESOPHAGUS: 40,
  STOMACH: 20,
  DUODENUM: 30,
  LEFT_KIDNEY: 150,
}
_ORGAN_HU_SD = {AORTA: 8.0, IVC: 6.0}  # contrast timing varies most in the vessels; others: 3

# Storage orientations, cycled over cases: a common LPS (DICOM-derived), the canonical RAS,
# a left-right flip, a superior-inferior flip, an in-plane axis swap and a coronal-like
# permutation, so a loader that ignores the affine visibly fails.
ORIENTATIONS = ("LPS", "RAS", "LAS", "PLS", "LPI", "RSA")

_AIR, _FAT, _VISCERAL_FAT, _MUSCLE, _LUNG = -1000.0, -100.0, -90.0, 50.0, -850.0

# Body-relative "N-space": r is towards the patient's right and a anterior, both in units of the
# body's half-width; t runs 0..2 from the bottom to the top slice. Anterior-posterior positions
# below assume a body half-depth of 0.72 and are rescaled to each case's depth.
_REF_DEPTH = 0.72
_T_EXTENT = 2.0


def case_ids(num_cases: int) -> list[str]:
  return [f"FLARE22_Tr_{i:04d}" for i in range(1, num_cases + 1)]


# ----------------------------------------------------------------------------------------------
# Geometry helpers


def _smooth_field(
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


class _Phantom:
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
    self.R = self.r_axis[:, None, None] + 0.035 * _smooth_field(rng, shape, ctrl)
    self.A = self.a_axis[None, :, None] + 0.030 * _smooth_field(rng, shape, ctrl)
    self.T = self.t_axis[None, None, :] + 0.050 * _smooth_field(rng, shape, ctrl)
    # Smooth fields that make each organ's surface irregular (mixed with per-organ weights).
    self.noise = [_smooth_field(rng, shape, (8, 8, 7)) for _ in range(3)]

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


# ----------------------------------------------------------------------------------------------
# Anatomy


def _draw_tissues(ph: _Phantom) -> tuple[np.ndarray, np.ndarray]:
  """Background HU (label 0 everywhere) and the mask where organs may lie."""
  rng, R, A, T = ph.rng, ph.R, ph.A, ph.T
  s = ph.a_scale
  n0, n1 = ph.noise[0], ph.noise[1]
  # Body cross-section: wider and deeper in some slices than others.
  p1, p2 = rng.uniform(0, 2 * np.pi, 2)
  width = 1 + 0.035 * np.sin(1.6 * T + p1) + 0.02 * np.sin(3.1 * T + p2)
  fat = rng.uniform(0.06, 0.13) * (1 + 0.15 * n1)
  wall = rng.uniform(0.05, 0.075)

  def inside(shrink):
    return (R / (width - shrink)) ** 2 + (A / (ph.depth * width - shrink)) ** 2 < 1 + 0.01 * n0

  body, wall_out, cavity = inside(0.0), inside(fat), inside(fat + wall)
  hu = np.full(ph.shape, _AIR, np.float32)
  hu[body] = _FAT + 8 * n0[body]
  hu[wall_out] = _MUSCLE
  hu[cavity] = _VISCERAL_FAT + 10 * n1[cavity]

  # Lung bases above the diaphragm; the liver and spleen domes later push into them.
  for side in (1, -1):
    lung = ((R - side * 0.48) / 0.40) ** 2 + ((A + 0.12 * s) / 0.45) ** 2 + (
      (T - 2.40) / 0.62
    ) ** 2 < 1
    hu[lung & cavity] = _LUNG + 25 * n0[lung & cavity]

  # Small bowel loops (wall, fluid, gas) in the lower abdomen, below the pancreas and duodenum.
  bowel_noise = _smooth_field(rng, ph.shape, (20, 20, 12))
  gas_noise = _smooth_field(rng, ph.shape, (24, 24, 14))
  loops = cavity & (T < 0.55) & (-0.22 * s < A) & (bowel_noise > 0.0)
  hu[loops] = np.where(bowel_noise[loops] < 0.4, 35.0, 5.0)
  gas = loops & (bowel_noise > 0.4) & (gas_noise > 1.2) & (A > 0)  # gas rises to the front
  hu[gas] = -700 + 60 * n1[gas]

  # Spine: vertebral bodies with discs, spinal canal, posterior arch and spinous process.
  blocked = np.zeros(ph.shape, bool)
  vb_a = -0.41 * s
  vb_r = 0.13 * rng.uniform(0.92, 1.08)
  d_vb = np.sqrt(R**2 + (A - vb_a) ** 2)
  vb = d_vb < vb_r
  period, phase = rng.uniform(0.22, 0.27), rng.uniform(0, 1)
  disc = ((T / period + phase) % 1.0) < 0.2
  hu[vb] = np.where(disc[vb], 90.0, np.where(d_vb[vb] > vb_r - 0.022, 750.0, 230.0))
  canal_a = vb_a - vb_r - 0.05
  d_canal = np.sqrt(R**2 + (A - canal_a) ** 2)
  arch = (d_canal < 0.085) & ~vb & ~disc
  spinous = (np.abs(R) < 0.025) & (canal_a > A) & (canal_a - 0.16 < A) & wall_out & ~disc
  # Paraspinal muscles first, so the bone drawn next sits inside them.
  for side in (1, -1):
    para = ((R - side * 0.15) / 0.13) ** 2 + ((A - canal_a + 0.03) / 0.11) ** 2 < 1
    para &= body & ~vb
    hu[para] = _MUSCLE
    blocked |= para
    # Psoas: grows towards the pelvis, absent above the kidneys' upper poles.
    rad = np.clip(0.015 + 0.075 * (1.25 - T) / 1.25, 0, None)
    psoas = ((R - side * 0.17) ** 2 + (A - vb_a - 0.02) ** 2 < rad**2) & (T < 1.25) & cavity
    hu[psoas] = _MUSCLE
    blocked |= psoas
  hu[arch | spinous] = 550.0
  hu[d_canal < 0.045] = 15.0
  blocked |= vb | arch | spinous | (d_canal < 0.085)

  # Ribs in the upper abdomen: slanted bands in the outer part of the wall, open anteriorly.
  rib_band = ((T - 0.12 * A / ph.depth) / rng.uniform(0.2, 0.24) + rng.uniform(0, 1)) % 1.0
  angle = np.degrees(np.arctan2(R, A))  # 0 = anterior midline
  ribs = (
    wall_out
    & ~inside(fat + 0.035)
    & (rib_band < 0.22)
    & (T > 0.95)
    & (np.abs(angle) > 35)
    & (np.abs(angle) < 160)
  )
  hu[ribs] = 700.0
  blocked |= ribs

  return hu, cavity & ~blocked


def _draw_organs(ph: _Phantom, allowed: np.ndarray) -> np.ndarray:
  """Label map; later organs overwrite earlier ones, small ones go last so they stay whole."""
  label = np.zeros(ph.shape, np.uint8)

  def paint(organ, mask):
    label[mask & allowed] = organ

  liver = ph.ellipsoid((0.40, 0.0, 1.48), (0.46, 0.50, 0.48), amp=0.1)
  liver |= ph.ellipsoid((0.0, 0.28, 1.62), (0.34, 0.18, 0.24), rot_deg=-15, amp=0.1)
  paint(LIVER, liver)
  paint(SPLEEN, ph.ellipsoid((-0.56, -0.26, 1.45), (0.15, 0.30, 0.30), rot_deg=40))
  paint(
    STOMACH,
    ph.tube(
      [
        (-0.33, -0.02, 1.76),
        (-0.36, 0.12, 1.52),
        (-0.26, 0.28, 1.28),
        (-0.06, 0.36, 1.15),
        (0.10, 0.30, 1.12),
      ],
      [0.16, 0.20, 0.17, 0.12, 0.08],
      amp=0.1,
    ),
  )
  paint(
    RIGHT_KIDNEY, ph.ellipsoid((0.40, -0.36, 0.80), (0.13, 0.17, 0.32), rot_deg=-30, tilt_deg=10)
  )
  paint(
    LEFT_KIDNEY, ph.ellipsoid((-0.40, -0.34, 0.88), (0.13, 0.17, 0.32), rot_deg=30, tilt_deg=-10)
  )
  paint(
    PANCREAS,
    ph.tube(
      [
        (0.15, 0.06, 0.94),
        (0.03, 0.10, 0.99),
        (-0.18, 0.06, 1.05),
        (-0.38, -0.08, 1.12),
        (-0.46, -0.14, 1.15),
      ],
      [0.11, 0.09, 0.085, 0.08, 0.07],
    ),
  )
  paint(
    DUODENUM,
    ph.tube(
      [
        (0.16, 0.26, 1.12),
        (0.26, 0.14, 1.10),
        (0.29, 0.04, 1.00),
        (0.29, 0.02, 0.80),
        (0.22, 0.03, 0.70),
        (0.05, 0.03, 0.68),
        (-0.10, 0.05, 0.72),
        (-0.14, 0.07, 0.86),
      ],
      [0.07] * 8,
    ),
  )
  paint(
    GALLBLADDER,
    ph.ellipsoid((0.30, 0.30, 0.98), (0.12, 0.10, 0.22), rot_deg=30, tilt_deg=-20, amp=0.08),
  )
  # The adrenals sit in retroperitoneal fat; clearing a fat halo first keeps them from being
  # embedded in liver or kidney, as they are in real scans.
  adrenals = [(RIGHT_ADRENAL, (0.26, -0.30, 1.20), -70), (LEFT_ADRENAL, (-0.25, -0.28, 1.18), 70)]
  adrenal_masks = []
  for organ, center, rot in adrenals:
    c = np.array(center) + ph.rng.normal(0, (0.015, 0.015, 0.03))
    # Thicker than life, so that a small model can learn them.
    semi = np.array((0.14, 0.065, 0.17)) * ph.rng.uniform(0.92, 1.08, 3)
    rot += ph.rng.normal(0, 6)
    halo = ph.ellipsoid(c, semi + 0.045, rot_deg=rot, amp=0.0, jitter=False)
    label[halo & allowed & (label != 0)] = 0
    adrenal_masks.append((organ, ph.ellipsoid(c, semi, rot_deg=rot, amp=0.06, jitter=False)))
  # Enters the stomach from its medial side, low enough to stay a few hundred voxels long.
  paint(
    ESOPHAGUS,
    ph.tube(
      [(-0.03, -0.01, 2.12), (-0.07, -0.01, 1.88), (-0.16, 0.0, 1.68), (-0.26, 0.03, 1.52)],
      [0.085, 0.085, 0.09, 0.09],
    ),
  )
  paint(
    IVC,
    ph.tube(
      [
        (0.10, -0.14, -0.1),
        (0.11, -0.14, 0.7),
        (0.14, -0.11, 1.3),
        (0.16, -0.08, 1.80),
        (0.10, -0.05, 2.12),
      ],
      [0.07, 0.075, 0.08, 0.08, 0.08],
    ),
  )
  paint(
    AORTA,
    ph.tube(
      [(-0.05, -0.20, -0.1), (-0.05, -0.19, 1.0), (-0.04, -0.18, 1.7), (-0.02, -0.19, 2.12)],
      [0.068, 0.07, 0.072, 0.075],
    ),
  )
  for organ, mask in adrenal_masks:
    paint(organ, mask)
  return label


def _sample_geometry(rng: np.random.Generator, shape, spacing):
  if spacing is None:
    fov = rng.uniform(84, 96)
    nxy = shape[0] if shape is not None else int(rng.integers(96, 129))
    sxy = round(float(np.clip(fov / nxy, 0.7, 0.9)), 3)
    sz = float(rng.choice([2.5, 3.0, 3.5, 4.0, 4.5, 5.0]))
    spacing = (sxy, sxy, sz)
  spacing = tuple(float(s) for s in spacing)
  if shape is None:
    # Keep the physical field of view roughly constant, so resampling to a common spacing
    # gives organs of a consistent size (as a real dataset's anatomy would be).
    nxy = int(np.clip(round(rng.uniform(84, 100) / spacing[0]), 96, 128))
    nz = int(np.clip(round(rng.uniform(110, 135) / spacing[2]), 24, 48))
    shape = (nxy, nxy, nz)
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3 or min(shape[:2]) < 32 or shape[2] < 8:
    raise ValueError(f"synthetic size {shape}: need (x, y, z) with x, y >= 32 and z >= 8")
  if len(spacing) != 3 or min(spacing) <= 0:
    raise ValueError(f"synthetic spacing {spacing}: need three positive (x, y, z) values in mm")
  return shape, spacing


def make_case(
  rng: np.random.Generator,
  shape: Sequence[int] | None = None,
  spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One phantom in the canonical RAS+ voxel grid.

  Args:
    rng: the case's random generator (all randomness comes from it).
    shape: (x, y, z) voxels; None picks 96-128 in-plane and 24-48 slices.
    spacing: (x, y, z) mm; None picks 0.7-0.9 mm in-plane and 2.5-5 mm between slices.

  Returns:
    image int16 HU (x, y, z), label uint8 (x, y, z), affine (4, 4) with positive diagonal.
  """
  shape, spacing = _sample_geometry(rng, shape, spacing)
  ph = _Phantom(rng, shape, spacing)
  hu, allowed = _draw_tissues(ph)
  label = _draw_organs(ph, allowed)

  texture = 4.0 * ph.noise[2]
  for organ in range(1, NUM_ORGANS + 1):
    m = label == organ
    mean = ORGAN_HU[organ] + rng.normal(0, _ORGAN_HU_SD.get(organ, 3.0))
    hu[m] = mean + texture[m]
    if organ in (RIGHT_KIDNEY, LEFT_KIDNEY):
      # Cortex brighter than medulla; the two average to the organ's mean.
      medulla = m & ph.ellipsoid(_centroid(ph, m), (0.05, 0.06, 0.14), jitter=False, amp=0.0)
      hu[m] += 8.0
      hu[medulla] -= 48.0
  # Partial-volume blur (more across the thick slices), then correlated noise like CT's.
  hu = ndimage.gaussian_filter(hu, sigma=(0.6, 0.6, 0.35), mode="nearest")
  noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=(0.6, 0.6, 0.0))
  hu += noise * (rng.uniform(10, 16) / max(float(noise.std()), 1e-6))
  image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

  origin = np.array([-(n - 1) / 2 * s for n, s in zip(shape, spacing)])
  origin += (rng.uniform(-20, 20), rng.uniform(-40, 0), rng.uniform(-300, -100))
  affine = np.eye(4)
  affine[:3, :3] = np.diag(spacing)
  affine[:3, 3] = origin
  return image, label, affine


def _centroid(ph: _Phantom, mask: np.ndarray) -> tuple[float, float, float]:
  idx = np.argwhere(mask).mean(0).astype(int)
  # Back to reference N-space (ellipsoid() rescales a by the case's depth again).
  return (float(ph.r_axis[idx[0]]), float(ph.a_axis[idx[1]]) / ph.a_scale, float(ph.t_axis[idx[2]]))


def reorient(
  image: np.ndarray, label: np.ndarray, affine: np.ndarray, axcodes: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Store the same physical anatomy with voxel axes pointing along `axcodes` (e.g. "LPS")."""
  transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(axcodes)))
  new_affine = affine @ nio.inv_ornt_aff(transform, image.shape)
  return (
    np.ascontiguousarray(nio.apply_orientation(image, transform)),
    np.ascontiguousarray(nio.apply_orientation(label, transform)),
    new_affine,
  )


def _save(array: np.ndarray, affine: np.ndarray, path: str, tmp_dir: str) -> None:
  img = nib.Nifti1Image(array, affine)
  img.set_sform(affine, code=1)
  img.set_qform(affine, code=1)
  img.header.set_data_dtype(array.dtype)
  img.header.set_xyzt_units("mm")
  # Written beside the target and renamed, so an interrupted run never leaves a truncated file.
  tmp = os.path.join(tmp_dir, os.path.basename(path))
  nib.save(img, tmp)
  os.replace(tmp, path)


def write_dataset(
  out_dir: str,
  num_cases: int,
  layout: str = "flare22",
  seed: int = 0,
  shape: Sequence[int] | None = None,
  spacing: Sequence[float] | None = None,
) -> list[str]:
  """Write `num_cases` synthetic cases in the FLARE22 or nnU-Net v2 layout; returns case ids.

  Case i depends only on (seed, i), so a larger dataset extends a smaller one. Re-running into
  the same directory overwrites the same files; a directory holding other cases is refused.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
  if num_cases < 1:
    raise ValueError(f"num_cases={num_cases}: need at least one case")
  images_dir = os.path.join(out_dir, "images" if layout == "flare22" else "imagesTr")
  labels_dir = os.path.join(out_dir, "labels" if layout == "flare22" else "labelsTr")
  ids = case_ids(num_cases)
  wanted = {f"{c}_0000.nii.gz" for c in ids} | {f"{c}.nii.gz" for c in ids}
  for d in (images_dir, labels_dir):
    extra = sorted(set(os.listdir(d)) - wanted) if os.path.isdir(d) else []
    if extra:
      raise DataError(
        f"{d}: already holds {len(extra)} other file(s) (e.g. {extra[0]}); "
        "write the synthetic dataset to an empty directory"
      )
    os.makedirs(d, exist_ok=True)
  tmp_dir = os.path.join(out_dir, ".synthetic_partial")
  os.makedirs(tmp_dir, exist_ok=True)
  for i, case in enumerate(ids):
    rng = np.random.default_rng([seed, i])
    image, label, affine = make_case(rng, shape, spacing)
    axcodes = ORIENTATIONS[(seed + i) % len(ORIENTATIONS)]  # cycled: any two cases differ
    image, label, affine = reorient(image, label, affine, axcodes)
    _save(image, affine, os.path.join(images_dir, f"{case}_0000.nii.gz"), tmp_dir)
    _save(label, affine, os.path.join(labels_dir, f"{case}.nii.gz"), tmp_dir)
  shutil.rmtree(tmp_dir, ignore_errors=True)
  if layout == "nnunet":
    dataset = {
      "name": "SyntheticFLARE22",
      "channel_names": {"0": "CT"},
      "labels": {name: k for k, name in sorted(FLARE22_CLASSES.items())},
      "numTraining": num_cases,
      "file_ending": ".nii.gz",
    }
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
      json.dump(dataset, f, indent=2)
  return ids


def _parse_triple(text: str, kind, flag: str):
  if not text:
    return None
  try:
    values = tuple(kind(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != 3:
    raise ValueError(f"--{flag}={text}: expected three comma-separated numbers X,Y,Z")
  return values


def _main(argv: list[str]) -> None:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  start = time.perf_counter()
  try:
    ids = write_dataset(
      f.out,
      f.cases,
      layout=f.layout,
      seed=f.seed,
      shape=_parse_triple(f.size, int, "size"),
      spacing=_parse_triple(f.spacing, float, "spacing"),
    )
  except (ValueError, OSError) as e:  # DataError is a ValueError: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(
    f"wrote {len(ids)} synthetic cases ({f.layout} layout) to {f.out} "
    f"in {time.perf_counter() - start:.1f} s"
  )


def _define_flags() -> None:
  # Defined only when run as a script: importing the module must not add flags that could clash
  # with another entry point's.
  from absl import flags

  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_integer("cases", 10, "Number of cases.", lower_bound=1)
  flags.DEFINE_enum(
    "layout",
    "flare22",
    list(LAYOUTS),
    "flare22 (images/, labels/) or nnunet (dataset.json, imagesTr/, labelsTr/).",
  )
  flags.DEFINE_integer("seed", 0, "Random seed; case i depends only on (seed, i).")
  flags.DEFINE_string(
    "size", "", "X,Y,Z voxels of every case (default: 96-128 in-plane, 24-48 slices)."
  )
  flags.DEFINE_string(
    "spacing", "", "X,Y,Z mm of every case (default: 0.7-0.9 in-plane, 2.5-5 between slices)."
  )


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(_main)
