"""Proof that training learns: a tiny VNet fits one synthetic case, and the loss falls on the
demo data. Both fail when learning is broken (e.g. zeroed gradients or shuffled labels)."""

import numpy as np
import pytest
from flax import jax_utils

from tests.conftest import make_tiny_config
from vnet_jax import train
from vnet_jax.data import phantom
from vnet_jax.experiments import base
from vnet_jax.model import build_model

# Classes of the fitted case: 1 liver, 2 both kidneys (everything else background).
ORGANS = ((phantom.LIVER,), (phantom.RIGHT_KIDNEY, phantom.LEFT_KIDNEY))


def _one_case():
  """A whole (16, 32, 32) phantom as a batch of one (z, y, x) patch: the image z-scored, its
  liver and kidneys as labels 1 and 2 (everything else 0)."""
  image, label, _ = phantom.make_case(np.random.default_rng(0), shape=(32, 32, 16))
  image = np.transpose(image, (2, 1, 0)).astype(np.float32)
  image = (image - image.mean()) / image.std()
  label = np.transpose(label, (2, 1, 0))
  classes = np.zeros(label.shape, np.int32)
  for c, organs in enumerate(ORGANS, 1):
    classes[np.isin(label, organs)] = c
  return image[None, None, ..., None], classes[None, None]


def _fit(steps: int, shuffle_labels: bool = False) -> np.ndarray:
  """Dice of each organ after `steps` steps on one patch (no augmentation, batch 1)."""
  config = make_tiny_config("/unused", "/unused", num_steps=steps, learning_rate=1e-2)
  config.lr_schedule = "constant"
  config.patch_size = (16, 32, 32)
  config.model.filters = (4, 8, 8, 16, 16)
  base.switch_off_augmentation(config)
  image, label = _one_case()
  truth = label[0, 0]
  if shuffle_labels:
    label = np.random.default_rng(1).permutation(label.ravel()).reshape(label.shape)
  num_classes = len(ORGANS) + 1
  model = build_model(config, num_classes, 1, bn_axis_name=train.AXIS)
  p_state = jax_utils.replicate(train.create_train_state(config, model))
  p_step = train.make_p_train_step(config, num_classes)
  batch = {"image": image, "label": label}
  for _ in range(steps):
    p_state, _ = p_step(p_state, batch)
  state = jax_utils.unreplicate(p_state)
  logits = model.clone(bn_axis_name=None).apply(
    {"params": state.params, "batch_stats": state.batch_stats}, image[0]
  )
  pred = np.argmax(np.asarray(logits)[0], -1)
  organs = range(1, num_classes)
  return np.array(
    [
      2 * np.sum((pred == c) & (truth == c)) / (np.sum(pred == c) + np.sum(truth == c))
      for c in organs
    ]
  )


@pytest.mark.slow
def test_a_tiny_vnet_fits_one_case():
  dice = _fit(steps=80)
  assert np.all(dice >= 0.9), dice


@pytest.mark.slow
def test_shuffled_labels_cannot_be_fitted():
  # The same run on labels that no longer follow the image: what the first test would see if
  # the data pipeline mixed up images and labels.
  dice = _fit(steps=80, shuffle_labels=True)
  assert np.all(dice < 0.6), dice
