"""Validation during training: compiled once per run, cases shared out between hosts."""

import numpy as np
import pytest

from tests.conftest import make_tiny_config
from tests.test_inference import WINDOW, make_model, random_volume
from vnet_jax import inference, train, validate


@pytest.mark.parametrize("num_cases,hosts", [(10, 1), (10, 3), (2, 4), (7, 2)])
def test_each_case_is_validated_on_exactly_one_host(num_cases, hosts):
  cases = [f"case_{i:02d}" for i in range(num_cases)]
  shares = [validate.host_share(cases, p, hosts) for p in range(hosts)]
  assert sorted(c for share in shares for c in share) == cases
  assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_gathering_on_one_host_returns_its_own_scores():
  scores = {"case_01": {"liver": {"dice": 0.5, "nsd": float("nan"), "hd95": 3.0}}}
  assert validate.gather_from_hosts(scores) == [scores]


def test_new_weights_give_new_predictions_without_a_new_compile():
  apply_fn, first = make_model(kernel=3)
  _, second = make_model(kernel=3, seed=1)
  volume = random_volume((12, 10, 9))
  reused = inference.SlidingWindowPredictor(apply_fn, first, WINDOW, 3)
  before = reused.predict_probabilities(volume, np.float32)
  reused.set_variables(second)
  after = reused.predict_probabilities(volume, np.float32)
  fresh = inference.SlidingWindowPredictor(apply_fn, second, WINDOW, 3)
  np.testing.assert_array_equal(after, fresh.predict_probabilities(volume, np.float32))
  assert not np.allclose(before, after)
  assert len(reused._step._executables) == 1


@pytest.mark.slow
def test_a_run_builds_its_validator_once(tiny_dataset, tmp_path, monkeypatch):
  built = []
  original = validate.Validator.__init__

  def counting_init(self, *args, **kwargs):
    built.append(1)
    original(self, *args, **kwargs)

  monkeypatch.setattr(validate.Validator, "__init__", counting_init)
  config = make_tiny_config(tiny_dataset, tmp_path / "cache", num_steps=2, eval_every=1)
  train.train_and_evaluate(config, tmp_path / "w")
  history = (tmp_path / "w" / "eval" / "history.jsonl").read_text().splitlines()
  assert len(history) == 2  # two evaluations ...
  assert built == [1]  # ... by one validator
