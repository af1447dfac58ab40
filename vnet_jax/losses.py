"""Segmentation losses, channels-last: the seed's Dice + focal and nnU-Net's Dice + CE.

- `dice_focal` (the seed's, the `segmentation_models` 3D definitions): class-weighted soft Dice
  over every class, plus focal_weight x categorical focal loss (alpha 0.25, gamma 2) averaged
  over every element (N, D, H, W, C); `focal_clip` 1e-7 is the seed's clipped focal loss, None
  the same loss without its dead gradient (see `focal_loss`).
- `dice_ce` (nnU-Net's DC_and_CE for 3d_fullres): batch soft Dice over the foreground classes,
  plus cross-entropy averaged over voxels.

Voxels whose label is negative ("ignore", e.g. where an augmentation's rotation reached outside
the patch) are left out of every loss through `mask`. All reductions run in float32 whatever the
model's compute dtype, so bfloat16 training keeps loss precision. `segmentation_loss` combines
them as `config.loss` says.
"""

import jax
import jax.numpy as jnp
from jax import lax

from vnet_jax.errors import ConfigError

_SPATIAL_AND_BATCH = (0, 1, 2, 3)  # (N, D, H, W); classes stay separate


@jax.custom_vjp
def softmax(logits):
  """jax.nn.softmax over the last (class) axis, with its gradient's class sum as a matrix-vector
  product.

  XLA:CPU (YNNPACK reductions) took 17 ms of a 64^3 step for that sum over the short class
  axis. Head, loss and their gradient at 64^3 x 14 classes: 27-31 ms against 40-43 with
  jax.nn.softmax (docs/performance.md). The forward's own sum stays a reduction, which is
  faster there.
  """
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(logits):
  probs = softmax(logits)
  return probs, probs


def _softmax_bwd(probs, grad):
  # HIGHEST keeps GPUs from summing in TF32.
  class_sum = lax.dot_general(
    probs * grad,
    jnp.ones(probs.shape[-1:], probs.dtype),
    (((probs.ndim - 1,), (0,)), ((), ())),
    precision=lax.Precision.HIGHEST,
  )
  return (probs * (grad - class_sum[..., None]),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def overlaps(pred, onehot, axis_name: str | None = None, mask=None):
  """Per-class (tp, fp, fn) of (soft or hard) predictions, summed over batch and space, in
  float32; under pmap, over every device's share of the batch with `axis_name`. Voxels where
  `mask` (N, D, H, W) is 0 count nowhere (their one-hot rows must be zero)."""
  pred = pred.astype(jnp.float32)
  onehot = onehot.astype(jnp.float32)
  if mask is not None:
    pred = pred * mask[..., None]
  sums = (
    jnp.sum(onehot * pred, axis=_SPATIAL_AND_BATCH),
    jnp.sum(pred, axis=_SPATIAL_AND_BATCH),
    jnp.sum(onehot, axis=_SPATIAL_AND_BATCH),
  )
  if axis_name is not None:
    sums = lax.psum(sums, axis_name)
  tp, sum_pred, sum_true = sums
  return tp, sum_pred - tp, sum_true - tp


def dice_loss(
  probs,
  onehot,
  class_weights=None,
  smooth: float = 1e-5,
  axis_name: str | None = None,
  mask=None,
  include_background: bool = True,
):
  """1 - mean_c(w_c * (2 tp_c + s) / (2 tp_c + fp_c + fn_c + s)), sums over batch and space.

  Under pmap, `axis_name` sums tp/fp/fn over every device's share of the batch, so the loss
  (and its gradient) is that of the whole global batch, as on one device. `mask` (N, D, H, W)
  is 1 where a voxel counts, 0 where it is ignored; without background, class 0 is left out of
  the mean (nnU-Net's batch Dice).
  """
  tp, fp, fn = overlaps(probs, onehot, axis_name, mask)
  score = (2.0 * tp + smooth) / (2.0 * tp + fn + fp + smooth)
  if class_weights is not None:
    score = score * jnp.asarray(class_weights, jnp.float32)
  if not include_background:
    score = score[1:]
  return 1.0 - jnp.mean(score)


def _voxel_count(onehot, mask):
  return onehot[..., 0].size if mask is None else jnp.maximum(jnp.sum(mask), 1.0)


def focal_loss(
  probs, onehot, alpha: float = 0.25, gamma: float = 2.0, mask=None, clip=1e-7, logits=None
):
  """Mean over every element (N, D, H, W, C) of -g * alpha * (1 - p)^gamma * log(p); with
  `mask`, over the elements of the voxels that count.

  clip: the seed's definition, p clipped to [clip, 1 - clip]. Its gradient is zero wherever the
    true class's p is below `clip`, so an organ whose probability training pushes that low early
    on never recovers. None: log(p) from log_softmax(`logits`) instead, no clipping, a gradient
    that never vanishes (the same loss wherever p is within the clip range).

  `onehot` rows are one-hot (all zero for ignored voxels), so each voxel has one non-zero term:
  it is evaluated on the true class's probability alone, not on all C (a third of the loss's
  time at 14 classes).
  """
  g = onehot.astype(jnp.float32)
  if clip is None:
    log_p = jnp.sum(g * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    p = jnp.exp(log_p)
  else:
    p = jnp.clip(jnp.sum(g * probs.astype(jnp.float32), axis=-1), clip, 1.0 - clip)
    log_p = jnp.log(p)
  total = jnp.sum(jnp.sum(g, axis=-1) * -alpha * (1.0 - p) ** gamma * log_p)
  return total / (_voxel_count(g, mask) * g.shape[-1])


def cross_entropy_loss(logits, onehot, mask=None):
  """Mean over the voxels that count of -log softmax(logits)[true class]."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(onehot.astype(jnp.float32) * log_p) / _voxel_count(onehot, mask)


LOSSES = ("dice_focal", "dice_ce")


def segmentation_loss(logits, labels, num_classes: int, config, class_weights=None, axis_name=None):
  """`config.name`'s loss of logits (N, D, H, W, C) against labels (N, D, H, W), where labels
  < 0 are ignored. Returns (loss, probabilities, {"dice_loss": ..., "focal_loss" | "ce_loss"})."""
  mask = (labels >= 0).astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # all zero where labels < 0
  probs = softmax(logits.astype(jnp.float32))
  if config.name == "dice_focal":
    dice = dice_loss(probs, onehot, class_weights, config.smooth, axis_name, mask)
    focal = focal_loss(
      probs, onehot, config.focal_alpha, config.focal_gamma, mask, config.focal_clip, logits
    )
    parts = {"focal_loss": focal}
    other = config.focal_weight * parts["focal_loss"]
  elif config.name == "dice_ce":
    dice = dice_loss(probs, onehot, None, config.smooth, axis_name, mask, include_background=False)
    parts = {"ce_loss": cross_entropy_loss(logits, onehot, mask)}
    other = config.ce_weight * parts["ce_loss"]
  else:
    raise ConfigError(f"config.loss.name must be one of {LOSSES}, got {config.name!r}")
  return dice + other, probs, {"dice_loss": dice, **parts}
