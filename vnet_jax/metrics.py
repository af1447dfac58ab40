"""Training-time metrics (the seed's Keras metrics) and the seed's class weights. All jit-able."""

from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np

_SPATIAL_AND_BATCH = (0, 1, 2, 3)


def accuracy(probs, onehot):
  """Fraction of voxels whose argmax class matches the one-hot target (Keras categorical
  accuracy)."""
  return jnp.mean((jnp.argmax(probs, -1) == jnp.argmax(onehot, -1)).astype(jnp.float32))


def iou_score(probs, onehot, threshold: float = 0.5, smooth: float = 1e-5):
  """segmentation_models IoU: probs binarised at threshold, per-class (tp+s)/(tp+fp+fn+s), mean."""
  pred = (probs > threshold).astype(jnp.float32)
  g = onehot.astype(jnp.float32)
  tp = jnp.sum(g * pred, axis=_SPATIAL_AND_BATCH)
  fp = jnp.sum(pred, axis=_SPATIAL_AND_BATCH) - tp
  fn = jnp.sum(g, axis=_SPATIAL_AND_BATCH) - tp
  return jnp.mean((tp + smooth) / (tp + fp + fn + smooth))


def confusion_matrix(pred_labels, true_labels, num_classes: int):
  """(num_classes, num_classes) counts; rows are true classes, columns predicted (Keras order)."""
  index = (
    true_labels.astype(jnp.int32).ravel() * num_classes + pred_labels.astype(jnp.int32).ravel()
  )
  counts = jnp.bincount(index, length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.float32)


def _overlaps(pred_labels, true_labels, num_classes):
  cm = confusion_matrix(pred_labels, true_labels, num_classes)
  tp = jnp.diag(cm)
  return tp, cm.sum(0) - tp, cm.sum(1) - tp


def mean_iou(pred_labels, true_labels, num_classes: int):
  """Keras MeanIoU: per class TP/(TP+FP+FN) over integer labels; classes never seen are left out."""
  tp, fp, fn = _overlaps(pred_labels, true_labels, num_classes)
  denom = tp + fp + fn
  present = denom > 0
  iou = jnp.where(present, tp / jnp.where(present, denom, 1.0), 0.0)
  return jnp.sum(iou) / jnp.maximum(jnp.sum(present), 1)


def dice_per_class(pred_labels, true_labels, num_classes: int):
  """Hard Dice per class, shape (num_classes,); 1.0 where a class is absent from both
  (FLARE22 rule)."""
  tp, fp, fn = _overlaps(pred_labels, true_labels, num_classes)
  denom = 2 * tp + fp + fn
  return jnp.where(denom > 0, 2 * tp / jnp.where(denom > 0, denom, 1.0), 1.0)


def class_weights_from_labels(label_volumes: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
  """The seed's Dice class weights n / (C * n_c) over all voxels of the given label volumes.

  A class with no voxel gets weight 0 (it cannot be scored, and an infinite weight would
  dominate the loss); the caller sees it in the returned array.
  """
  counts = np.zeros(num_classes, np.int64)
  for labels in label_volumes:
    labels = np.asarray(labels)
    if labels.size and labels.max() >= num_classes:
      raise ValueError(f"label value {int(labels.max())} is not below num_classes={num_classes}")
    counts += np.bincount(labels.ravel().astype(np.int64), minlength=num_classes)
  total = counts.sum()
  weights = np.zeros(num_classes, np.float64)
  present = counts > 0
  weights[present] = total / (num_classes * counts[present])
  return weights
