"""Sliding-window inference (nnU-Net / MONAI style): Gaussian-weighted overlapping windows,
mirror TTA.

A volume of any size is tiled into windows of the training patch size. Windows are run in
fixed-size groups of `(num_devices, windows_per_device)` through one `jax.pmap`'d function, so
the model compiles once per window size and every later volume reuses it. The softmax
probabilities of each window, weighted by a Gaussian that trusts window centres more than
their borders, are summed on the host together with the weights, and divided at the end.

Host memory stays bounded by accumulating slab-wise along D: windows are visited in order of
their D start, and once every window starting at a given D has been added, the rows before the
next D start are touched by no later window, so they are normalised and written out (float16
probabilities or uint8 labels) and the float32 accumulator only ever spans one window depth.
"""

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils

from vnet_jax import runtime

ApplyFn = Callable[[Any, jax.Array], jax.Array]

# All 8 subsets of the spatial axes of a (N, D, H, W, C) batch: the mirror TTA flips.
MIRROR_AXES: tuple[tuple[int, ...], ...] = tuple(
  axes for r in range(4) for axes in itertools.combinations((1, 2, 3), r)
)


def gaussian_importance_map(
  window: Sequence[int], sigma_scale: float = 1 / 8, floor: float = 1e-4
) -> np.ndarray:
  """Separable Gaussian over a window, max 1, sigma = window * sigma_scale per axis.

  Centred at (size - 1) / 2 rather than nnU-Net's size // 2 so the map is mirror-symmetric: a
  flipped window is then weighted exactly like the unflipped one. Each 1D profile is clipped
  from below at `floor` so no weight is zero (nnU-Net replaces zeros by the smallest nonzero
  value) and the 3D minimum, floor**3, stays far above float32 underflow. The floor is applied
  per axis, not to the 3D map: a 3D floor (MONAI clamps at 1e-3) flattens the weights near
  volume corners, where every covering window is near its own border, and lets a window's
  zero-padded border count as much as another window's interior. At the default sigma the
  floor is inactive (the profile ends at exp(-8) ~ 3.4e-4).
  """
  window = tuple(int(w) for w in window)
  if len(window) != 3 or min(window) < 1:
    raise ValueError(f"window must be three positive sizes, got {window}")
  g = np.ones((), np.float64)
  for size in window:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    sigma = max(size * sigma_scale, 1e-6)
    profile = np.exp(-0.5 * (x / sigma) ** 2)
    g = np.multiply.outer(g, np.maximum(profile / profile.max(), floor))
  return g.astype(np.float32)


def axis_starts(size: int, window: int, overlap: float = 0.5) -> list[int]:
  """Window starts along one axis, as nnU-Net's compute_steps_for_sliding_window.

  The number of steps is the fewest that keeps the step at most window * (1 - overlap); the
  steps are then spread evenly between 0 and size - window (rounded), so the last window is
  flush with the end and the overlap is as uniform as the sizes allow.
  """
  if size < window:
    raise ValueError(f"axis of size {size} is smaller than the window {window}; pad it first")
  if not 0 <= overlap < 1:
    raise ValueError(f"overlap must be in [0, 1), got {overlap}")
  target_step = window * (1 - overlap)
  num_steps = int(np.ceil((size - window) / target_step)) + 1
  if num_steps == 1:
    return [0]
  actual_step = (size - window) / (num_steps - 1)
  return [int(np.round(actual_step * i)) for i in range(num_steps)]


def window_starts(
  shape: Sequence[int], window: Sequence[int], overlap: float = 0.5
) -> list[tuple[int, int, int]]:
  """All window corners for a (D, H, W) shape at least as large as the window, D-major order.

  D-major order is what the slab accumulation relies on: all windows with one D start come
  before any window with a larger one.
  """
  shape, window = tuple(shape)[:3], tuple(window)
  per_axis = [axis_starts(s, w, overlap) for s, w in zip(shape, window)]
  return list(itertools.product(*per_axis))


def _pad_to_window(
  volume: np.ndarray, window: tuple[int, ...]
) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """Pads D, H, W up to the window with 0 (the mean after z-scoring, as nnU-Net), centred."""
  pads = []
  for size, w in zip(volume.shape[:3], window):
    extra = max(w - size, 0)
    pads.append((extra // 2, extra - extra // 2))
  if not any(before or after for before, after in pads):
    return volume, pads
  return np.pad(volume, pads + [(0, 0)], mode="constant", constant_values=0), pads


class SlidingWindowPredictor:
  """Sliding-window predictor for one model and window size, compiled once and reused.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits` with x (N, D, H, W, C) float32 and logits
      (N, D, H, W, num_classes) float32 or bfloat16 (e.g. `lambda v, x: model.apply(v, x)`).
    variables: what `apply_fn` takes first; replicated to the devices once, here.
    window: (D, H, W) window, normally the training patch size.
    num_classes: number of logits per voxel.
    overlap: fraction of a window shared with its neighbour along each axis (0.5 as nnU-Net).
    windows_per_device: windows each device runs per call.
    tta: average softmax probabilities over the 8 mirrorings of the spatial axes.
    devices: devices to spread windows over; default all local devices.
    sigma_scale: Gaussian sigma as a fraction of the window size.
  """

  def __init__(
    self,
    apply_fn: ApplyFn,
    variables: Any,
    window: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    windows_per_device: int = 1,
    tta: bool = False,
    devices: Sequence[jax.Device] | None = None,
    sigma_scale: float = 1 / 8,
  ):
    self.window = tuple(int(w) for w in window)
    if len(self.window) != 3 or min(self.window) < 1:
      raise ValueError(f"window must be three positive sizes, got {window}")
    if not 0 <= overlap < 1:
      raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if windows_per_device < 1:
      raise ValueError(f"windows_per_device must be >= 1, got {windows_per_device}")
    self.num_classes = int(num_classes)
    self.overlap = float(overlap)
    self.windows_per_device = int(windows_per_device)
    self.tta = bool(tta)
    self.devices = list(devices) if devices is not None else jax.local_devices()
    self.num_devices = len(self.devices)
    self.gaussian = gaussian_importance_map(self.window, sigma_scale)
    self.set_variables(variables)
    self._gaussian = jax_utils.replicate(jnp.asarray(self.gaussian), self.devices)
    self._step = runtime.pmap(self._device_step(apply_fn), devices=self.devices)

  def set_variables(self, variables: Any) -> None:
    """New weights for the same model: sent to the devices, nothing recompiled."""
    # Replicated once per call here: per-group broadcasting would re-send them for every group.
    self._variables = jax_utils.replicate(variables, self.devices)

  @property
  def group_size(self) -> int:
    return self.num_devices * self.windows_per_device

  def _device_step(self, apply_fn: ApplyFn) -> Callable:
    num_classes, tta = self.num_classes, self.tta

    def step(variables, gaussian, x):
      def probs(x):
        logits = apply_fn(variables, x)
        if logits.shape[-1] != num_classes:
          raise ValueError(f"apply_fn returned {logits.shape[-1]} classes, expected {num_classes}")
        # bfloat16 logits lose too much in exp/normalise; float32 from here on.
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

      if tta:
        # Sequential flips (not one 8x batch) keep device memory at one window batch.
        p = sum(
          jnp.flip(probs(jnp.flip(x, axes)), axes) if axes else probs(x) for axes in MIRROR_AXES
        )
        p = p / len(MIRROR_AXES)
      else:
        p = probs(x)
      # Weighting on the device saves a full host pass over every window's probabilities.
      return p * gaussian[None, ..., None]

    return step

  # ----------------------------------------------------------------------------- accumulation

  def _accumulate(
    self, volume: np.ndarray, emit: Callable[[int, np.ndarray, np.ndarray], None]
  ) -> None:
    """Runs every window of `volume` (already >= window) and hands finished D-slabs to `emit`.

    `emit(d0, acc, weight)` gets rows [d0, d0 + len(acc)) of the volume as the float32
    Gaussian-weighted probability sums (rows, H, W, K) and weight sums (rows, H, W); views into
    the accumulator, valid only during the call.
    """
    wd, wh, ww = self.window
    _, H, W, C = volume.shape
    starts = window_starts(volume.shape, self.window, self.overlap)
    acc = np.zeros((wd, H, W, self.num_classes), np.float32)
    weight = np.zeros((wd, H, W), np.float32)
    lo = 0  # volume row held in accumulator row 0

    def add(window_probs: np.ndarray, start: tuple[int, int, int]) -> None:
      nonlocal lo
      ds, hs, ws = start
      if ds > lo:
        # Windows arrive in D-major order, so rows before ds are complete: emit and slide.
        done = ds - lo
        emit(lo, acc[:done], weight[:done])
        acc[: wd - done] = acc[done:]
        weight[: wd - done] = weight[done:]
        acc[wd - done :] = 0
        weight[wd - done :] = 0
        lo = ds
      acc[:, hs : hs + wh, ws : ws + ww] += window_probs
      weight[:, hs : hs + wh, ws : ws + ww] += self.gaussian

    group = self.group_size
    batch_shape = (self.num_devices, self.windows_per_device, wd, wh, ww, C)
    pending = None  # (device result, starts): fetched after the next group is dispatched
    for g0 in range(0, len(starts), group):
      group_starts = starts[g0 : g0 + group]
      # The last group is padded with copies of its last window (results dropped), so every
      # call has the same shape and the compiled function is reused.
      padded = group_starts + [group_starts[-1]] * (group - len(group_starts))
      x = np.empty(batch_shape, np.float32).reshape(group, wd, wh, ww, C)
      for i, (ds, hs, ws) in enumerate(padded):
        x[i] = volume[ds : ds + wd, hs : hs + wh, ws : ws + ww]
      result = self._step(self._variables, self._gaussian, x.reshape(batch_shape))
      if pending is not None:
        self._consume(pending, add)
      pending = (result, group_starts)
    if pending is not None:
      self._consume(pending, add)
    emit(lo, acc, weight)

  def _consume(self, pending, add) -> None:
    result, group_starts = pending
    out = np.asarray(result).reshape((self.group_size, *self.window, self.num_classes))
    for i, start in enumerate(group_starts):
      add(out[i], start)

  def _run(
    self,
    volume: np.ndarray,
    finish: Callable[[np.ndarray, np.ndarray], np.ndarray],
    out_dtype,
    out_channels: tuple[int, ...],
  ) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 4:
      raise ValueError(f"volume must be (D, H, W, C), got shape {volume.shape}")
    if not np.issubdtype(volume.dtype, np.floating):
      volume = volume.astype(np.float32)
    shape = volume.shape[:3]
    padded, pads = _pad_to_window(volume, self.window)
    (pd, _), (ph, _), (pw, _) = pads
    out = np.empty(shape + out_channels, out_dtype)

    def emit(d0: int, acc: np.ndarray, weight: np.ndarray) -> None:
      # Padded rows map back by the leading pad; rows that are only padding are dropped.
      r0, r1 = max(d0, pd), min(d0 + len(acc), pd + shape[0])
      if r0 >= r1:
        return
      rows = slice(r0 - d0, r1 - d0)
      crop = (rows, slice(ph, ph + shape[1]), slice(pw, pw + shape[2]))
      out[r0 - pd : r1 - pd] = finish(acc[crop], weight[crop])

    self._accumulate(padded, emit)
    return out

  # ----------------------------------------------------------------------------------- public

  def predict_probabilities(self, volume: np.ndarray, dtype=np.float16) -> np.ndarray:
    """(D, H, W, C) volume -> (D, H, W, num_classes) softmax probabilities in `dtype`."""
    return self._run(
      volume,
      lambda acc, w: (acc / w[..., None]).astype(dtype),
      np.dtype(dtype),
      (self.num_classes,),
    )

  def predict_labels(self, volume: np.ndarray) -> np.ndarray:
    """(D, H, W, C) volume -> (D, H, W) uint8 argmax labels."""
    if self.num_classes > 256:
      raise ValueError(f"uint8 labels cannot hold {self.num_classes} classes")
    # Dividing by the (positive) weight cannot change the argmax, so it is skipped.
    return self._run(volume, lambda acc, w: np.argmax(acc, axis=-1).astype(np.uint8), np.uint8, ())
