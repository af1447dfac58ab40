"""Sliding-window inference on the devices: the JAX side of `sliding_window`.

`WindowRunner` is a `sliding_window.RunGroup`: one `jax.pmap`'d function takes a group of
`(num_devices, windows_per_device)` windows and returns their softmax probabilities, averaged
over the folds of an ensemble and, with TTA, over the 8 mirrorings of the spatial axes. It
compiles once per window size and fold count; every later volume, and new weights of the same
model (`set_variables`), reuse it.

The folds' variables are stacked on a leading axis and scanned inside the compiled function,
which adds each fold's probabilities to one running sum: device memory holds one window batch's
activations whatever the number of folds, the host receives probabilities already averaged, and
the model compiles once. The mirrorings run one after another for the same reason.

Given `weights` (the sliding window's Gaussian), the runner also multiplies the probabilities by
them on the devices, which saves the host a full pass over every window.

`SlidingWindowPredictor` is the single-model predictor (validation during training, the
benchmarks): a `WindowRunner` for one set of weights inside a `sliding_window.SlidingWindow`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils

from vnet_jax import runtime
from vnet_jax.sliding_window import MIRROR_AXES, SlidingWindow, gaussian_importance_map

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def stack_folds(fold_variables: Sequence[Any]) -> Any:
  """The folds' variables (same tree, same shapes) as one tree with a leading fold axis."""
  if not fold_variables:
    raise ValueError("no fold variables given")
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(v) for v in leaves]), *fold_variables)


class _GroupResult:
  """A group's probabilities, still on the devices until `np.asarray` reads them."""

  def __init__(self, result: jax.Array, shape: tuple[int, ...]):
    self._result, self._shape = result, shape

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    return np.asarray(self._result, dtype).reshape(self._shape)


class WindowRunner:
  """`run_group` for `sliding_window`: windows -> probabilities averaged over folds and TTA.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits` with x (N, D, H, W, C) float32 and logits
      (N, D, H, W, num_classes) float32 or bfloat16 (e.g. `lambda v, x: model.apply(v, x)`).
    fold_variables: what `apply_fn` takes first, one per fold (same tree and shapes); sent to
      the devices once, here.
    num_classes: number of logits per voxel.
    tta: average softmax probabilities over the 8 mirrorings of the spatial axes.
    windows_per_device: windows each device runs per call.
    devices: devices to spread windows over; default all local devices.
    weights: optional (D, H, W) window weights the probabilities are multiplied by on the
      devices (`sliding_window.SlidingWindow` then adds them as they come).
  """

  def __init__(
    self,
    apply_fn: ApplyFn,
    fold_variables: Sequence[Any],
    num_classes: int,
    tta: bool = False,
    windows_per_device: int = 1,
    devices: Sequence[jax.Device] | None = None,
    weights: np.ndarray | None = None,
  ):
    if windows_per_device < 1:
      raise ValueError(f"windows_per_device must be >= 1, got {windows_per_device}")
    self.num_classes = int(num_classes)
    self.tta = bool(tta)
    self.windows_per_device = int(windows_per_device)
    self.devices = list(devices) if devices is not None else jax.local_devices()
    self.num_devices = len(self.devices)
    self.num_folds = len(fold_variables)
    self.set_variables(fold_variables)
    self.weights = None if weights is None else np.asarray(weights, np.float32)
    ones = np.ones((), np.float32)  # no weights: a scalar 1, so one step function serves both
    w = ones if self.weights is None else self.weights[..., None]
    self._weights = jax_utils.replicate(jnp.asarray(w), self.devices)
    self._step = runtime.pmap(self._device_step(apply_fn), devices=self.devices)

  @property
  def group_size(self) -> int:
    return self.num_devices * self.windows_per_device

  def set_variables(self, fold_variables: Sequence[Any]) -> None:
    """New weights for the same model and fold count: sent to the devices, nothing recompiled."""
    if len(fold_variables) != self.num_folds:
      raise ValueError(
        f"variables of {len(fold_variables)} fold(s) given, built for {self.num_folds}"
      )
    # Replicated once here: per-group broadcasting would re-send them for every group.
    self._variables = jax_utils.replicate(stack_folds(fold_variables), self.devices)

  def _device_step(self, apply_fn: ApplyFn) -> Callable:
    num_classes, tta, num_folds = self.num_classes, self.tta, self.num_folds

    def probs(variables, x):
      logits = apply_fn(variables, x)
      if logits.shape[-1] != num_classes:
        raise ValueError(f"apply_fn returned {logits.shape[-1]} classes, expected {num_classes}")
      # bfloat16 logits lose too much in exp/normalise; float32 from here on.
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def fold_probs(variables, x):
      if not tta:
        return probs(variables, x)
      # Sequential flips (not one 8x batch) keep device memory at one window batch.
      p = sum(
        jnp.flip(probs(variables, jnp.flip(x, axes)), axes) if axes else probs(variables, x)
        for axes in MIRROR_AXES
      )
      return p / len(MIRROR_AXES)

    def step(stacked, weights, x):
      if num_folds == 1:  # no loop around the model: the single-model program stays as it was
        return fold_probs(jax.tree.map(lambda v: v[0], stacked), x) * weights
      total = jnp.zeros((*x.shape[:-1], num_classes), jnp.float32)
      total, _ = jax.lax.scan(lambda t, v: (t + fold_probs(v, x), None), total, stacked)
      return total / num_folds * weights

    return step

  def __call__(self, windows: np.ndarray) -> _GroupResult:
    """(group_size, D, H, W, C) windows -> their (group_size, D, H, W, K) probabilities."""
    windows = np.asarray(windows, np.float32)
    if windows.ndim != 5 or windows.shape[0] != self.group_size:
      raise ValueError(f"expected ({self.group_size}, D, H, W, C) windows, got {windows.shape}")
    per_device = windows.reshape(self.num_devices, self.windows_per_device, *windows.shape[1:])
    result = self._step(self._variables, self._weights, per_device)
    return _GroupResult(result, (*windows.shape[:4], self.num_classes))


class SlidingWindowPredictor(SlidingWindow):
  """Sliding-window predictor for one model and window size, compiled once and reused.

  Args:
    apply_fn, num_classes, windows_per_device, tta, devices: as `WindowRunner`.
    variables: what `apply_fn` takes first; replicated to the devices once, here.
    window: (D, H, W) window, normally the training patch size.
    overlap: fraction of a window shared with its neighbour along each axis (0.5 as nnU-Net).
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
    weights = gaussian_importance_map(window, sigma_scale)
    self.runner = WindowRunner(
      apply_fn, [variables], num_classes, tta, windows_per_device, devices, weights
    )
    super().__init__(self.runner, window, num_classes, self.runner.group_size, overlap, sigma_scale)
    self.num_devices = self.runner.num_devices
    self._step = self.runner._step  # the compiled window function (one executable per shape)

  def set_variables(self, variables: Any) -> None:
    """New weights for the same model: sent to the devices, nothing recompiled."""
    self.runner.set_variables([variables])
