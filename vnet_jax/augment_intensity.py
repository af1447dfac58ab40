"""Intensity augmentation of one patch in pure JAX (image only): Gaussian noise, Gaussian blur,
multiplicative brightness, contrast, low-resolution simulation and gamma, as nnU-Net v2's.

`x` is `(D, H, W, C)` float32; factors, sigmas and zooms are per channel (`(C,)`, blur's sigma
`(C, 3)`). Blur and low resolution are separable, applied as one small matrix product per axis.
"""

import jax
import jax.numpy as jnp

_EPS = 1e-7  # floor of a range or std that is divided by (nnU-Net's)


def gaussian_noise(x: jax.Array, std: jax.Array, key: jax.Array) -> jax.Array:
  """x plus N(0, std^2) noise, one field for all channels, as nnU-Net's synchronised noise."""
  return x + std * jax.random.normal(key, x.shape[:-1] + (1,))


def _stats_axes(x):
  return tuple(range(x.ndim - 1))


def _min_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel min and max of `(..., C)` as one variadic reduction: XLA:CPU fuses separate
  min/max reductions into their consumers in a form several times slower."""
  inf = jnp.array(jnp.inf, x.dtype)
  lo, neg_hi = jax.lax.reduce(
    (x, -x),
    (inf, inf),
    lambda a, b: (jnp.minimum(a[0], b[0]), jnp.minimum(a[1], b[1])),
    _stats_axes(x),
  )
  return lo, -neg_hi


def brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
  """x * factor, a factor per channel."""
  return x * factor


def contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  """(x - mean) * factor + mean per channel, clipped to the channel's original [min, max]."""
  axes = _stats_axes(x)
  mean = jnp.mean(x, axis=axes)
  lo, hi = _min_max(x)
  return jnp.clip((x - mean) * factor + mean, lo, hi)


def gamma(x: jax.Array, g: jax.Array, invert: bool = False) -> jax.Array:
  """Per channel: x mapped to [0, 1] over its range, raised to g, mapped back, then shifted and
  scaled to its original mean and std. `invert`: the same on -x, negated back (brightens)."""
  axes = _stats_axes(x)
  if invert:
    x = -x
  mean, std = jnp.mean(x, axis=axes), jnp.std(x, axis=axes)
  lo, hi = _min_max(x)
  span = hi - lo
  # exp(g log u) rather than u ** g: XLA:CPU's power is slower, and 0 still maps to 0.
  u = jnp.clip((x - lo) / jnp.maximum(span, _EPS), 0.0, 1.0)
  y = jnp.exp(g * jnp.log(u)) * span + lo
  y_mean, y_std = jnp.mean(y, axis=axes), jnp.std(y, axis=axes)
  y = (y - y_mean) * (std / jnp.maximum(y_std, _EPS)) + mean
  return -y if invert else y


def _along_axes(x: jax.Array, matrices: dict[int, jax.Array]) -> jax.Array:
  """Applies per-channel linear maps along spatial axes: `matrices[a]` is `(C, n_a, n_a)` and
  out[.., i, .., c] = sum_j m[c, i, j] x[.., j, .., c] along axis a.

  Separable filters as small matrix products: XLA materialises a product's input once, where a
  sum of shifted slices would get its producers (resampling, random noise) fused in and
  recomputed for every tap.
  """
  for a, m in matrices.items():
    moved = jnp.moveaxis(x, a, -2)  # (..., n, C)
    out = jnp.einsum("cij,...jc->...ic", m, moved, precision=jax.lax.Precision.HIGHEST)
    x = jnp.moveaxis(out, -2, a)
  return x


def _reflect(index: jax.Array, n: int) -> jax.Array:
  """Index mirrored into [0, n) without repeating the edge (torch/NumPy "reflect")."""
  if n == 1:
    return jnp.zeros_like(index)
  period = 2 * (n - 1)
  index = jnp.abs(index) % period
  return jnp.where(index >= n, period - index, index)


def gaussian_kernels(sigma: jax.Array, radius: int) -> jax.Array:
  """Normalised 1D Gaussian taps `(..., 2 * radius + 1)` for sigmas `(...)` (sigma 0: identity)."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  s = jnp.maximum(sigma, 1e-3)[..., None]
  taps = jnp.exp(-0.5 * (offsets / s) ** 2)
  return taps / jnp.sum(taps, axis=-1, keepdims=True)


def blur_matrix(sigma: jax.Array, n: int, radius: int) -> jax.Array:
  """`(C, n, n)` Gaussian blur along an axis of length n, sigma `(C,)`, taps up to +-radius,
  mirrored borders (torch/NumPy "reflect", as nnU-Net's)."""
  taps = gaussian_kernels(sigma, radius)  # (C, K)
  i = jnp.arange(n)
  m = 0.0
  for k in range(2 * radius + 1):
    hit = jax.nn.one_hot(_reflect(i + k - radius, n), n, dtype=jnp.float32)  # (n, n)
    m = m + taps[:, k, None, None] * hit
  return m


def blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian blur of `(D, H, W, C)`, sigma `(C, 3)` per channel and axis."""
  return _along_axes(x, {a: blur_matrix(sigma[:, a], x.shape[a], radius) for a in range(3)})


def low_resolution_matrix(zoom: jax.Array, n: int) -> jax.Array:
  """`(C, n, n)` for zooms `(C,)` in (0, 1]: nearest ("nearest-exact") down to round(n * zoom)
  samples, then linear (half-pixel centres) back to n, as torch's interpolate (nnU-Net)."""
  m = jnp.maximum(jnp.round(n * zoom), 1.0)[:, None]  # (C, 1) low-resolution length
  p = jnp.maximum((jnp.arange(n, dtype=jnp.float32) + 0.5) * (m / n) - 0.5, 0.0)
  j0 = jnp.floor(p)
  j1 = jnp.minimum(j0 + 1, m - 1)
  t = (p - j0)[..., None]

  def source(j):  # full-resolution voxel that low-resolution sample j copies
    return jnp.minimum(jnp.floor((j + 0.5) * (n / m)), n - 1).astype(jnp.int32)

  a = jax.nn.one_hot(source(j0), n, dtype=jnp.float32)
  b = jax.nn.one_hot(source(j1), n, dtype=jnp.float32)
  return a * (1 - t) + b * t  # exact at t = 0 and t = 1: zoom 1 keeps x


def low_resolution(x: jax.Array, zoom: jax.Array, axes: tuple[int, ...] = (0, 1, 2)) -> jax.Array:
  """Simulated low resolution of `(D, H, W, C)`, zoom `(C,)` per channel, the same on `axes`."""
  return _along_axes(x, {a: low_resolution_matrix(zoom, x.shape[a]) for a in axes})
