"""A FLARE22-like abdominal CT phantom: one synthetic case as image, label map and affine.

Each case (`make_case`) holds air, a body outline whose cross-section changes along z,
subcutaneous fat, an abdominal muscle wall, spine (vertebral bodies, discs, posterior arch),
paraspinal and psoas muscles, ribs and lung bases at the top, bowel loops with gas at the bottom,
and the 13 FLARE22 organs as randomly deformed ellipsoids and tubes with organ-specific Hounsfield
units, Gaussian noise and a little partial-volume blur. Labels and HU follow FLARE22 (int16
images, uint8 labels, ids 1..13). Positions are in the body-relative coordinates of
`phantom_shapes`.

Scale: by default the volume is small enough to train on a CPU (96-128 voxels in-plane at
0.7-0.9 mm, 24-48 slices at 2.5-5 mm), so the phantom is a scaled-down abdomen (about 80 mm
wide, 120 mm long) rather than a life-size one; anatomy is laid out in body-relative coordinates,
so a larger `shape` gives a larger, finer phantom with the same layout. Small organs (adrenals,
esophagus, gallbladder, pancreas) are drawn larger than life and in consistent places, so that
a tiny model trained for minutes can learn them.

The case comes in a canonical RAS+ voxel grid (axis 0 towards the patient's right, 1 anterior,
2 superior); `shape` and `spacing` are in that (x, y, z) order, not the package's (D, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from vnet_jax.data.phantom_shapes import Phantom, smooth_field
from vnet_jax.errors import DataError

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

_AIR, _FAT, _VISCERAL_FAT, _MUSCLE, _LUNG = -1000.0, -100.0, -90.0, 50.0, -850.0


def _draw_tissues(ph: Phantom) -> tuple[np.ndarray, np.ndarray]:
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
  bowel_noise = smooth_field(rng, ph.shape, (20, 20, 12))
  gas_noise = smooth_field(rng, ph.shape, (24, 24, 14))
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


def _draw_organs(ph: Phantom, allowed: np.ndarray) -> np.ndarray:
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
    raise DataError(f"synthetic size {shape}: need (x, y, z) with x, y >= 32 and z >= 8")
  if len(spacing) != 3 or min(spacing) <= 0:
    raise DataError(f"synthetic spacing {spacing}: need three positive (x, y, z) values in mm")
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

  Raises:
    DataError: a shape smaller than (32, 32, 8) or a spacing that is not three positive values.
  """
  shape, spacing = _sample_geometry(rng, shape, spacing)
  ph = Phantom(rng, shape, spacing)
  hu, allowed = _draw_tissues(ph)
  label = _draw_organs(ph, allowed)

  texture = 4.0 * ph.noise[2]
  for organ in range(1, NUM_ORGANS + 1):
    m = label == organ
    mean = ORGAN_HU[organ] + rng.normal(0, _ORGAN_HU_SD.get(organ, 3.0))
    hu[m] = mean + texture[m]
    if organ in (RIGHT_KIDNEY, LEFT_KIDNEY):
      # Cortex brighter than medulla; the two average to the organ's mean.
      medulla = m & ph.ellipsoid(ph.centroid(m), (0.05, 0.06, 0.14), jitter=False, amp=0.0)
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
