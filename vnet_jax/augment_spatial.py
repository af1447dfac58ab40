"""Spatial augmentation of one patch in pure JAX: the sampling matrix (rotation x isotropic
scaling), elastic displacement fields, the one resampling that applies them (`warp`), mirroring.

An image `(D, H, W, C)` float32 and its label `(D, H, W)` int move together: the image is
resampled trilinearly, the label nearest. Output voxels whose source lies outside the patch (more
than half a voxel off its grid) get image 0 and label -1, "ignore" for the losses. With
`anisotropic=True` only H and W are scaled and displaced, in the same way on every slice.
"""

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-7  # floor of a divisor


def rotation_matrix(angles: jax.Array) -> jax.Array:
  """Rotation by `angles` (radians) about the D, H and W axes in turn: R_D @ R_H @ R_W."""
  angles = jnp.asarray(angles, jnp.float32)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  out = jnp.eye(3, dtype=jnp.float32)
  for axis in range(3):
    i, j = [k for k in range(3) if k != axis]
    m = jnp.eye(3, dtype=jnp.float32)
    m = m.at[i, i].set(cos[axis]).at[i, j].set(-sin[axis])
    m = m.at[j, i].set(sin[axis]).at[j, j].set(cos[axis])
    out = out @ m
  return out


def sampling_matrix(angles: jax.Array, zoom: jax.Array, anisotropic: bool) -> jax.Array:
  """The `matrix` of `warp` for a rotation by `angles` and a zoom (> 1 zooms in: objects grow),
  the same on every axis, or on H and W only when `anisotropic`."""
  inv = 1.0 / zoom
  return rotation_matrix(angles) * jnp.stack([1.0 if anisotropic else inv, inv, inv])


def _lerp(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
  # Exact at t = 0 and t = 1, which keeps integer coordinates (the identity) lossless.
  return a * (1 - t) + b * t


def warp(
  image: jax.Array,
  label: jax.Array,
  matrix: jax.Array,
  displacement: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Resamples one patch: output voxel o reads the input at `c + matrix @ (o - c + u(o))`.

  c is the patch centre ((n - 1) / 2 per axis), `displacement` u an optional `(D, H, W, 3)`
  field in output voxels. Image trilinear (edge values within half a voxel of the border), label
  nearest; where the source is outside [-0.5, n - 0.5) on some axis, image 0 and label -1.
  """
  shape = label.shape
  centre = [(n - 1) / 2 for n in shape]
  rel = []
  for a, n in enumerate(shape):
    r = jnp.arange(n, dtype=jnp.float32) - centre[a]
    r = r.reshape([n if b == a else 1 for b in range(3)])
    rel.append(r if displacement is None else r + displacement[..., a])
  coords = [
    jnp.broadcast_to(
      centre[a] + (matrix[a, 0] * rel[0] + matrix[a, 1] * rel[1] + matrix[a, 2] * rel[2]), shape
    )
    for a in range(3)
  ]
  return _resample(image, label, coords)


def _resample(
  image: jax.Array, label: jax.Array, coords: list[jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """Trilinear image, nearest label at `coords` (one (D, H, W) array per axis)."""
  shape = label.shape
  _, h, w = shape
  inside = jnp.ones(shape, bool)
  base, frac = [], []
  for a, n in enumerate(shape):
    inside &= (coords[a] >= -0.5) & (coords[a] < n - 0.5)
    x = jnp.clip(coords[a], 0.0, n - 1.0)
    # Cell corner f and f + 1 both in range: the last voxel is read as f + 1 with weight 1.
    f = jnp.clip(jnp.floor(x), 0.0, max(n - 2, 0))
    base.append(f.astype(jnp.int32))
    frac.append(x - f)
  strides = (h * w, w, 1)
  steps = [s if n > 1 else 0 for s, n in zip(strides, shape)]
  index = (base[0] * h + base[1]) * w + base[2]
  flat = image.reshape(-1, image.shape[-1])
  # Corner k is +1 along D if bit 0 of k, H if bit 1, W if bit 2; then linear along D, H, W.
  values = [
    jnp.take(flat, index + sum(steps[a] * (k >> a & 1) for a in range(3)), axis=0, mode="clip")
    for k in range(8)
  ]
  for a in range(3):
    t = frac[a][..., None]
    values = [_lerp(values[i], values[i + 1], t) for i in range(0, len(values), 2)]
  nearest = index + sum(jnp.where(frac[a] >= 0.5, steps[a], 0) for a in range(3))
  labels = jnp.take(label.reshape(-1), nearest, mode="clip")
  out_image = jnp.where(inside[..., None], values[0], 0).astype(image.dtype)
  return out_image, jnp.where(inside, labels, -1).astype(label.dtype)


def _smooth_field(key: jax.Array, shape: tuple[int, ...], sigma: float, components: int):
  """`components` random fields on `shape`, Gaussian-smoothed white noise (sigma voxels),
  scaled to max |value| 1.

  The noise lives on a grid of spacing sigma reaching 3 sigma past the borders (its variance
  then ripples by 1e-4, by Poisson summation) and the smoothing is a small matrix product per
  axis: n / sigma + 7 random numbers per axis instead of n (random bits cost more than the rest
  of the deformation on a CPU).
  """
  matrices = []
  for n in shape:
    centres = np.arange(-3 * sigma, n - 1 + 4 * sigma, sigma)
    d = (np.arange(n)[:, None] - centres[None, :]) / sigma
    matrices.append(jnp.asarray(np.exp(-0.5 * d**2), jnp.float32))  # (n, grid points)
  noise = jax.random.normal(key, (components, *[m.shape[1] for m in matrices]), jnp.float32)
  grid, out = "abc"[: len(shape)], "xyz"[: len(shape)]
  spec = ",".join(o + i for o, i in zip(out, grid)) + f",n{grid}->n{out}"  # "xa,yb,zc,nabc->nxyz"
  field = jnp.einsum(spec, *matrices, noise, precision=jax.lax.Precision.HIGHEST)
  axes = tuple(range(1, len(shape) + 1))
  peak = jnp.max(jnp.abs(field), axis=axes, keepdims=True)
  return field / jnp.maximum(peak, _EPS)


def elastic_displacement(
  key: jax.Array, shape: tuple[int, int, int], sigma: float, alpha: jax.Array, anisotropic: bool
) -> jax.Array:
  """The `displacement` of `warp`, `(*shape, 3)`: smooth random fields (Gaussian of sigma
  voxels) of largest displacement `alpha` voxels. When `anisotropic`, one in-plane field for
  every slice and none along D, as nnU-Net's 2D augmentation."""
  if anisotropic:
    field = _smooth_field(key, shape[1:], sigma, 2) * alpha
    field = jnp.broadcast_to(field[:, None], (2, *shape))
    field = jnp.concatenate([jnp.zeros_like(field[:1]), field])
  else:
    field = _smooth_field(key, shape, sigma, 3) * alpha
  return jnp.moveaxis(field, 0, -1)


def mirror(
  image: jax.Array, label: jax.Array, flips: jax.Array, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
  """Image and label flipped along each of `axes` where `flips[axis]` (booleans for D, H, W)."""
  for axis in axes:
    flip = flips[axis]
    image = jnp.where(flip, jnp.flip(image, axis), image)
    label = jnp.where(flip, jnp.flip(label, axis), label)
  return image, label
