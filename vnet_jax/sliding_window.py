"""Sliding-window prediction of a whole volume (nnU-Net / MONAI style), in NumPy only.

A volume of any size is tiled into overlapping windows (`window_starts`, nnU-Net's steps). The
windows go, in fixed-size groups, through `run_group`, which maps windows to class
probabilities and is the only place a model appears: `inference.WindowRunner` runs a JAX model
(over devices, folds and mirror TTA); anything else with the same contract works (e.g. an
exported model in another runtime):

    run_group(windows: float32 (G, D, H, W, C)) -> float32 (G, D, H, W, K) probabilities

already averaged over folds and TTA. It may return anything `np.asarray` accepts; the result of
one group is read only after the next group has been handed over, so an asynchronous runner
(a JAX array) computes the next group while the host adds up the last one. The last group is
padded with copies of its last window, so every call has the same shape.

Each window's probabilities are weighted by a Gaussian (`gaussian_importance_map`) that trusts
window centres more than their borders; probability and weight sums are divided at the end.
The weighting happens here, on the host, unless the runner has a `weights` attribute: it then
returns probabilities already multiplied by those weights (`inference.WindowRunner` does it on
the devices, sparing the host a full pass over every window), and they are summed as given.

Host memory stays bounded by accumulating slab-wise along D: windows are visited in order of
their D start, and once every window starting at a given D has been added, the rows before the
next D start are touched by no later window, so they are normalised and written out (float16
probabilities or uint8 labels) and the float32 accumulator only ever spans one window depth.
"""

import itertools
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

RunGroup = Callable[[np.ndarray], ArrayLike]

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
  window = _window(window)
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
  _check_overlap(overlap)
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


def pad_to_window(
  volume: np.ndarray, window: Sequence[int]
) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """Pads D, H, W up to the window with 0 (the mean after z-scoring, as nnU-Net), centred."""
  pads = []
  for size, w in zip(volume.shape[:3], window):
    extra = max(w - size, 0)
    pads.append((extra // 2, extra - extra // 2))
  if not any(before or after for before, after in pads):
    return volume, pads
  return np.pad(volume, pads + [(0, 0)], mode="constant", constant_values=0), pads


def _window(window: Sequence[int]) -> tuple[int, int, int]:
  window = tuple(int(w) for w in window)
  if len(window) != 3 or min(window) < 1:
    raise ValueError(f"window must be three positive sizes, got {window}")
  return window


def _check_overlap(overlap: float) -> None:
  if not 0 <= overlap < 1:
    raise ValueError(f"overlap must be in [0, 1), got {overlap}")


class SlidingWindow:
  """Whole-volume probabilities or labels from a window-level `run_group` (module docstring).

  Args:
    run_group: windows (G, D, H, W, C) float32 -> probabilities (G, D, H, W, num_classes).
    window: (D, H, W) window, normally the training patch size.
    num_classes: probabilities per voxel.
    group_size: G, the windows of every call.
    overlap: fraction of a window shared with its neighbour along each axis (0.5 as nnU-Net).
    sigma_scale: Gaussian sigma as a fraction of the window size.
  """

  def __init__(
    self,
    run_group: RunGroup,
    window: Sequence[int],
    num_classes: int,
    group_size: int = 1,
    overlap: float = 0.5,
    sigma_scale: float = 1 / 8,
  ):
    self.window = _window(window)
    _check_overlap(overlap)
    if group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {group_size}")
    self.run_group = run_group
    self.num_classes = int(num_classes)
    self.group_size = int(group_size)
    self.overlap = float(overlap)
    self.gaussian = gaussian_importance_map(self.window, sigma_scale)
    self.weighted_by_runner = getattr(run_group, "weights", None) is not None
    if self.weighted_by_runner:
      self.gaussian = np.asarray(run_group.weights, np.float32)
      if self.gaussian.shape != self.window:
        raise ValueError(f"run_group weights {self.gaussian.shape} do not fit window {self.window}")

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
    K, group = self.num_classes, self.group_size
    starts = window_starts(volume.shape, self.window, self.overlap)
    acc = np.zeros((wd, H, W, K), np.float32)
    weight = np.zeros((wd, H, W), np.float32)
    weighted = np.empty((*self.window, K), np.float32)  # one window's weighted probabilities
    gaussian = self.gaussian[..., None]
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
      if self.weighted_by_runner:
        acc[:, hs : hs + wh, ws : ws + ww] += window_probs
      else:
        np.multiply(window_probs, gaussian, out=weighted)
        acc[:, hs : hs + wh, ws : ws + ww] += weighted
      weight[:, hs : hs + wh, ws : ws + ww] += self.gaussian

    def consume(result, group_starts) -> None:
      out = np.asarray(result)
      if out.shape != (group, *self.window, K):
        raise ValueError(
          f"run_group returned shape {out.shape}, expected {(group, *self.window, K)}"
        )
      for i, start in enumerate(group_starts):
        add(out[i], start)

    pending = None  # (result, starts): read after the next group is handed over
    for g0 in range(0, len(starts), group):
      group_starts = starts[g0 : g0 + group]
      padded = group_starts + [group_starts[-1]] * (group - len(group_starts))
      # A fresh buffer per group: an asynchronous runner may still be reading the last one
      # (JAX on CPU can use a NumPy buffer without copying it).
      x = np.empty((group, wd, wh, ww, C), np.float32)
      for i, (ds, hs, ws) in enumerate(padded):
        x[i] = volume[ds : ds + wd, hs : hs + wh, ws : ws + ww]
      result = self.run_group(x)
      if pending is not None:
        consume(*pending)
      pending = (result, group_starts)
    if pending is not None:
      consume(*pending)
    emit(lo, acc, weight)

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
    padded, pads = pad_to_window(volume, self.window)
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
