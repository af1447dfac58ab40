"""Training: the pmap'd step against a hand-written step, multi-device equality, the loop,
resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import jax_utils

from tests.conftest import make_tiny_config, tiny_flags
from vnet_jax import losses, runtime, train
from vnet_jax.model import build_model

ROOT = Path(__file__).resolve().parent.parent


def _batch(rng, devices, per_device, patch, num_classes):
  return {
    "image": rng.normal(size=(devices, per_device, *patch, 1)).astype(np.float32),
    "label": rng.integers(0, num_classes, (devices, per_device, *patch)).astype(np.int32),
  }


def test_train_step_matches_a_hand_written_adam_step(tmp_path):
  config = make_tiny_config(
    tmp_path, tmp_path, **{"loss.class_weights": (0.5, 1.0, 2.0), "model.dropout_rate": 0.2}
  )
  model = build_model(config, num_classes=3, in_channels=1, bn_axis_name=train.AXIS)
  state = train.create_train_state(config, model)
  batch = _batch(np.random.default_rng(0), 1, 2, config.patch_size, 3)
  p_step = train.make_p_train_step(config, num_classes=3)
  new_state, step_metrics = p_step(jax_utils.replicate(state), batch)

  ref_model = build_model(config, num_classes=3, in_channels=1)
  key = jax.random.fold_in(jax.random.fold_in(state.rng, 0), 0)
  onehot = jax.nn.one_hot(batch["label"][0], 3)

  def loss_fn(params):
    logits, upd = ref_model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      batch["image"][0],
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
    return losses.total_loss(jax.nn.softmax(logits), onehot, (0.5, 1.0, 2.0)), upd

  # Same compiler options as the step, so both sum in the same order.
  (loss, upd), grads = jax.jit(
    jax.value_and_grad(loss_fn, has_aux=True), compiler_options=runtime.compiler_options()
  )(state.params)
  tx = optax.adam(config.learning_rate)
  updates, _ = tx.update(grads, tx.init(state.params), state.params)
  expected = optax.apply_updates(state.params, updates)
  got = jax_utils.unreplicate(new_state)
  np.testing.assert_allclose(step_metrics["loss"][0], loss, rtol=1e-5)

  # Adam's first step is lr * sign(g): compare where the gradient is not float noise (e.g. the
  # biases of convolutions followed by BatchNorm, whose true gradient is zero).
  def close(a, b, g):
    mask = np.abs(np.asarray(g)) > 1e-6
    np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[mask], rtol=1e-4, atol=1e-7)
    return np.array([mask.sum(), mask.size])

  counts = sum(
    jax.tree_util.tree_leaves(jax.tree_util.tree_map(close, got.params, expected, grads))
  )
  assert counts[0] > 0.75 * counts[1]
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
    got.batch_stats,
    upd["batch_stats"],
  )
  assert int(got.step) == 1
  assert set(step_metrics) == {"loss", "dice_loss", "focal_loss", "accuracy", "iou"}


def test_learning_rate_schedule_warmup_then_cosine(tmp_path):
  config = make_tiny_config(
    tmp_path, tmp_path, lr_schedule="cosine", warmup_steps=10, num_steps=110, learning_rate=1e-3
  )
  schedule = train.learning_rate_schedule(config)
  np.testing.assert_allclose(schedule(5), 0.5e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 1e-3 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-9)
  with pytest.raises(ValueError, match="lr_schedule"):
    train.learning_rate_schedule(make_tiny_config(tmp_path, tmp_path, lr_schedule="step"))


def test_class_weights_must_match_the_classes(tmp_path):
  config = make_tiny_config(tmp_path, tmp_path, **{"loss.class_weights": (1.0, 3.0)})
  np.testing.assert_allclose(train.class_weights(config, 2), [1.0, 3.0])
  config.loss.normalize_class_weights = True
  np.testing.assert_allclose(train.class_weights(config, 2), [0.5, 1.5])
  with pytest.raises(ValueError, match="3 classes"):
    train.class_weights(config, 3)


_TWO_DEVICES = r"""
import functools, jax, numpy as np, optax
from tests.conftest import make_tiny_config
from vnet_jax import train
assert jax.local_device_count() == 2
config = make_tiny_config("/nonexistent", "/nonexistent")
from vnet_jax.model import build_model
model = build_model(config, num_classes=3, in_channels=1, bn_axis_name=train.AXIS)
state = train.create_train_state(config, model)
# SGD keeps gradient float noise at noise level (Adam would scale it up to a full step), so the
# comparison below checks gradients, BatchNorm synchronisation and the Dice sums exactly.
sgd = optax.sgd(0.1)
state = state.replace(tx=sgd, opt_state=sgd.init(state.params))
step = functools.partial(train.train_step, num_classes=3, loss_config=config.loss, weights=None)
rng = np.random.default_rng(0)
batches = [{"image": rng.normal(size=(4, *config.patch_size, 1)).astype(np.float32),
            "label": rng.integers(0, 3, (4, *config.patch_size)).astype(np.int32)}
           for _ in range(3)]
results = []
for devices in (jax.devices()[:1], jax.devices()):
  n = len(devices)
  p_step = jax.pmap(step, axis_name=train.AXIS, devices=devices)
  s = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n), state)
  for b in batches:
    s, m = p_step(s, {k: v.reshape(n, 4 // n, *v.shape[1:]) for k, v in b.items()})
  results.append((jax.tree_util.tree_map(lambda x: np.asarray(x)[0], s), float(m["loss"][0])))
(one, loss1), (two, loss2) = results
np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
jax.tree_util.tree_map(close, one.params, two.params)
jax.tree_util.tree_map(close, one.batch_stats, two.batch_stats)
print("OK")
"""


def _env(devices: int) -> dict:
  return {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(ROOT),
  }


def test_two_devices_equal_one_device_with_the_same_global_batch():
  out = subprocess.run(
    [sys.executable, "-c", _TWO_DEVICES],
    env=_env(2),
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------------------- end to end (slow)


def run_main(workdir, data_dir, cache_dir, *extra, devices=1, check=True, **overrides):
  cmd = [
    sys.executable,
    "-m",
    "vnet_jax.main",
    "--experiment=flare22",
    "--fold=0",
    f"--workdir={workdir}",
    *tiny_flags(data_dir, cache_dir, **overrides),
    *extra,
  ]
  out = subprocess.run(
    cmd, env=_env(devices), capture_output=True, text=True, timeout=600, cwd=ROOT
  )
  if check:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out


def load_params(workdir, step=None):
  ckpt = Path(workdir) / "checkpoints"
  step = step or max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  return step, ocp.StandardCheckpointer().restore((ckpt / str(step) / "state").absolute())


@pytest.mark.slow
def test_main_trains_validates_and_writes_its_outputs(tmp_path, tiny_dataset):
  work = tmp_path / "run"
  out = run_main(work, tiny_dataset, tmp_path / "cache", eval_every=4)
  assert "mean" in out.stdout and "liver" in out.stdout
  records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for key in ("loss", "dice_loss", "focal_loss", "accuracy", "iou", "learning_rate", "steps_per_s"):
    assert all(np.isfinite(r[key]) for r in records), key
  config = json.loads((work / "config.json").read_text())
  assert config["num_steps"] == 4 and config["model"]["filters"] == [2, 4, 4, 8, 8]
  summary = json.loads((work / "eval" / "summary.json").read_text())
  assert set(summary["per_class"]) == {
    "liver",
    "right kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior vena cava",
    "right adrenal gland",
    "left adrenal gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left kidney",
  }
  splits = json.loads((work / "splits.json").read_text())
  assert [c["case"] for c in summary["per_case"]] == splits[0]["val"]
  assert 0.0 <= summary["mean_dice"] <= 1.0
  assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  assert list((work / "tensorboard").glob("events.out.tfevents.*"))
  assert (work / "plan.json").exists() and (work / "report.html").exists()
  assert (work / "plots" / "training_curves.png").exists()
  assert sorted(p.stem for p in (work / "eval" / "predictions").glob("*.npz")) == sorted(
    splits[0]["val"]
  )

  # --mode=eval restores the best checkpoint (the only one with a validation score: step 4).
  out = run_main(work, tiny_dataset, tmp_path / "cache", "--mode=eval", eval_every=4)
  again = json.loads((work / "eval" / "summary.json").read_text())
  assert again["step"] == 4 and abs(again["mean_dice"] - summary["mean_dice"]) < 1e-6


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, tiny_dataset):
  steps = dict(num_steps=60, checkpoint_every=5, log_every=5, **{"augment.noise_prob": 0.5})
  run_main(tmp_path / "straight", tiny_dataset, tmp_path / "cache", **steps)

  work = tmp_path / "killed"
  cmd = [
    sys.executable,
    "-m",
    "vnet_jax.main",
    "--experiment=flare22",
    f"--workdir={work}",
    *tiny_flags(tiny_dataset, tmp_path / "cache", **steps),
  ]
  proc = subprocess.Popen(
    cmd, env=_env(1), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 300
  while (
    not (work / "checkpoints" / "10").exists() and time.time() < deadline and proc.poll() is None
  ):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at, _ = load_params(work)
  assert killed_at < 60, "the run finished before it could be killed"

  run_main(work, tiny_dataset, tmp_path / "cache", **steps)
  step_a, a = load_params(tmp_path / "straight")
  step_b, b = load_params(work)
  assert step_a == step_b == 60
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_dataset):
  out = run_main(
    tmp_path / "run",
    tiny_dataset,
    tmp_path / "cache",
    check=False,
    num_steps=12,
    checkpoint_every=1,
    learning_rate=1e30,
  )
  assert out.returncode != 0
  message = out.stderr.strip().splitlines()[-1]
  assert message.startswith("error: non-finite loss") and "at step" in message
  bad_step = int(message.split("at step ")[1].split(";")[0])
  last, params = load_params(tmp_path / "run")
  assert last == bad_step - 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_missing_dataset_is_one_line_pointing_to_the_data(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "vnet_jax.main",
      "--experiment=flare22",
      f"--workdir={tmp_path}/w",
      f"--data_dir={tmp_path}/FLARE22Train",
    ],
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert (
    last.startswith("error: ")
    and "FLARE22Train" in last
    and "7860267" in last
    and "Traceback" not in out.stderr
  )


def test_config_overrides_from_the_command_line_reach_the_run(tmp_path, tiny_dataset):
  # An optional (None) field and a tuple field; the run stops at validation of the fold index.
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "vnet_jax.main",
      "--experiment=seed",
      "--fold=7",
      f"--workdir={tmp_path}/w",
      f"--data_dir={tiny_dataset}",
      "--config.loss.class_weights=1,1,1,1",
      "--config.model.filters=8,16,32,64,64",
      f"--config.data.cache_dir={tmp_path}/cache",
    ],
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert out.returncode == 1 and "fold" in out.stderr.strip().splitlines()[-1]
  config = json.loads((tmp_path / "w" / "config.json").read_text())
  assert config["loss"]["class_weights"] == [1, 1, 1, 1]
  assert config["model"]["filters"] == [8, 16, 32, 64, 64]
  assert config["data"]["label_map"] == [[1, 1], [2, 2], [13, 2], [3, 3]]


@pytest.mark.slow
def test_two_processes_of_two_devices_match_one_process_of_four(tmp_path, tiny_dataset):
  """Multi-host on loopback: gloo CPU collectives, each process reading its own shard."""
  # No BatchNorm: biases ahead of it have float-noise gradients that Adam scales up to a full step.
  steps = dict(num_steps=3, checkpoint_every=3, eval_every=1000, **{"model.batch_norm": False})
  run_main(tmp_path / "single", tiny_dataset, tmp_path / "cache", devices=4, **steps)
  import portpicker

  port = portpicker.pick_unused_port()
  work = tmp_path / "multi"
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "vnet_jax.main",
        "--experiment=flare22",
        f"--workdir={work}",
        *tiny_flags(tiny_dataset, tmp_path / "cache", **steps),
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      env=_env(2),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(err[-2000:] for _, err in outputs)
  step_a, a = load_params(tmp_path / "single")
  step_b, b = load_params(work)
  assert step_a == step_b == 3
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)
  # Each process kept its own data-iterator position.
  assert len(list((work / "checkpoints" / "3" / "data_iter").iterdir())) >= 2
