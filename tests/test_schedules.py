"""Learning-rate schedules and the anisotropy rule of the on-device augmentation."""

import numpy as np
import pytest

from vnet_jax import augment, train
from vnet_jax.experiments import base


@pytest.mark.parametrize("warmup", [0, 10])
def test_poly_schedule_is_nnunets(warmup):
  c = base.get_config()
  c.lr_schedule, c.learning_rate, c.num_steps, c.warmup_steps = "poly", 0.01, 110, warmup
  schedule = train.learning_rate_schedule(c)
  decay = c.num_steps - warmup
  for t in (0, 1, 37, 99, 100):
    if warmup and t < warmup:
      expected = 0.01 * t / warmup
    else:
      expected = 0.01 * (1 - min(t - warmup, decay) / decay) ** 0.9
    np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-5, atol=1e-9)


def test_an_unknown_schedule_is_a_config_error():
  c = base.get_config()
  c.lr_schedule = "step"
  with pytest.raises(ValueError, match="'constant', 'cosine' or 'poly'"):
    train.learning_rate_schedule(c)


@pytest.mark.parametrize(
  "spacing,expected",
  [((2.5, 0.8, 0.8), True), ((4.0, 1.6, 1.6), False), ((1.0, 1.0, 1.0), False), (None, False)],
)
def test_rotations_stay_in_plane_for_anisotropic_spacing(spacing, expected):
  assert augment.is_anisotropic(spacing) is expected
