"""Training-time metrics (the seed's Keras metrics), jit-able."""

import jax.numpy as jnp

from vnet_jax.losses import overlaps


def accuracy(probs, onehot, mask=None):
  """Fraction of voxels whose argmax class matches the one-hot target (Keras categorical
  accuracy); with `mask` (N, D, H, W: 1 where a voxel counts, 0 where it is ignored), of the
  voxels that count."""
  correct = (jnp.argmax(probs, -1) == jnp.argmax(onehot, -1)).astype(jnp.float32)
  if mask is None:
    return jnp.mean(correct)
  return jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def iou_score(
  probs,
  onehot,
  threshold: float = 0.5,
  smooth: float = 1e-5,
  axis_name: str | None = None,
  mask=None,
):
  """segmentation_models IoU: probs binarised at threshold, per-class (tp+s)/(tp+fp+fn+s), mean.

  Under pmap, `axis_name` sums tp/fp/fn over every device's share of the batch, so the score is
  that of the whole global batch, as on one device (a mean of per-device ratios is not). With
  `mask`, voxels where it is 0 are left out.
  """
  tp, fp, fn = overlaps(probs > threshold, onehot, axis_name, mask)
  return jnp.mean((tp + smooth) / (tp + fp + fn + smooth))
