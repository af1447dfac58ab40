"""Metric writers (JSON lines, TensorBoard) and the training log that feeds them."""

import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from vnet_jax import metric_writers
from vnet_jax.errors import TrainingError


def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the event files under logdir (TFRecord framing: length, crc, data, crc)."""
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(logdir.rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_jsonl_keeps_nesting_and_tensorboard_joins_keys(tmp_path):
  jsonl = metric_writers.JsonlWriter(tmp_path / "sub" / "m.jsonl")
  tensorboard = metric_writers.TensorBoardWriter(tmp_path / "tb")
  for step, dice, liver in ((5, 0.5, 0.75), (10, 0.25, 0.125)):
    values = {"mean_dice": dice, "per_class": {"liver": liver}}
    jsonl.write_scalars(step, values)
    tensorboard.write_scalars(step, {"eval": values})
  jsonl.close()
  tensorboard.close()
  lines = [json.loads(line) for line in (tmp_path / "sub" / "m.jsonl").read_text().splitlines()]
  assert lines == [
    {"step": 5, "mean_dice": 0.5, "per_class": {"liver": 0.75}},
    {"step": 10, "mean_dice": 0.25, "per_class": {"liver": 0.125}},
  ]
  assert _tensorboard_scalars(tmp_path / "tb") == {
    "eval/mean_dice": [(5, 0.5), (10, 0.25)],
    "eval/per_class/liver": [(5, 0.75), (10, 0.125)],
  }


def test_a_resumed_jsonl_drops_the_lines_of_the_steps_it_computes_again(tmp_path):
  path = tmp_path / "metrics.jsonl"
  first = metric_writers.JsonlWriter(path)
  for step in range(1, 6):
    first.write_scalars(step, {"loss": 1.0 / step})
  with path.open("a") as f:
    f.write('{"step": 6, "lo')  # the half line of a killed run
  resumed = metric_writers.JsonlWriter(path, resume_step=3)
  resumed.write_scalars(4, {"loss": 0.5})
  steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
  assert steps == [1, 2, 3, 4]
  metric_writers.JsonlWriter(path)  # without resume_step nothing is dropped
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == steps


def _device_metrics(loss: float) -> dict:
  # As a pmap'd step returns them: one value per device.
  names = ("loss", "dice_loss", "focal_loss", "accuracy", "iou")
  return {k: jnp.asarray([loss if k == "loss" else 0.5]) for k in names}


def test_training_log_writes_the_last_step_of_each_flush(tmp_path, capsys):
  log = metric_writers.TrainingLog(tmp_path, lambda step: 1e-3 * (step + 1), 4, 0)
  log.add(1, _device_metrics(2.0))
  log.add(2, _device_metrics(1.5))
  log.flush(log=True)
  log.add(3, _device_metrics(1.0))
  log.flush(log=False)  # fetched and checked, not written
  log.add_eval(3, {"mean_dice": 0.6, "per_class": {"liver": {"dice": 0.6, "nsd": 0.7}}})
  log.close()
  (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert record["step"] == 2 and record["loss"] == 1.5
  np.testing.assert_allclose(record["learning_rate"], 2e-3)
  assert "step 2/4  loss 1.5000" in capsys.readouterr().out
  history = json.loads((tmp_path / "eval" / "history.jsonl").read_text())
  assert history == {"step": 3, "mean_dice": 0.6, "per_class": {"liver": 0.6}}
  tags = _tensorboard_scalars(tmp_path / "tensorboard")
  assert tags["train/loss"] == [(2, 1.5)] and tags["eval/per_class/liver"][0][0] == 3


def test_a_non_finite_loss_stops_the_run_naming_its_step(tmp_path):
  log = metric_writers.TrainingLog(tmp_path, lambda step: 1e-3, 10, 0)
  log.add(1, _device_metrics(1.0))
  log.add(2, _device_metrics(float("nan")))
  log.add(3, _device_metrics(1.0))
  with pytest.raises(TrainingError, match="non-finite loss .* at step 2"):
    log.flush(log=False)
  log.close()
