"""Training: the pmap'd step against a hand-written step, multi-device equality, and end to end:
outputs, learning, resume after SIGKILL, divergence, several hosts."""

import functools
import json
import shutil
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

from tests.conftest import make_tiny_config, subprocess_env, tiny_flags
from vnet_jax import augment, losses, runtime, train
from vnet_jax.errors import TrainingError
from vnet_jax.model import build_model

ROOT = Path(__file__).resolve().parent.parent


def _batch(rng, devices, per_device, patch, num_classes):
  return {
    "image": rng.normal(size=(devices, per_device, *patch, 1)).astype(np.float32),
    "label": rng.integers(0, num_classes, (devices, per_device, *patch)).astype(np.int32),
  }


# One level (a residual block with BatchNorm, dropout, the head): all a step's parts, compiled
# in about a second.
ONE_LEVEL = {"model.filters": (4,)}


@pytest.mark.slow
def test_train_step_matches_a_hand_written_adam_step(tmp_path):
  loss_config = {"focal_weight": 0.5, "focal_alpha": 0.5, "focal_gamma": 1.5}
  config = make_tiny_config(
    tmp_path,
    tmp_path,
    **ONE_LEVEL,
    **{"loss.class_weights": (0.5, 1.0, 2.0), "model.dropout_rate": 0.2},
    **{f"loss.{k}": v for k, v in loss_config.items()},
  )
  model = build_model(config, num_classes=3, in_channels=1, bn_axis_name=train.AXIS)
  # At step 3: the dropout key is folded from the step and the device index (0 here).
  state = train.create_train_state(config, model).replace(step=3)
  batch = _batch(np.random.default_rng(0), 1, 2, config.patch_size, 3)
  p_step = train.make_p_train_step(config, num_classes=3)
  # Host arrays in and out: jax_utils.(un)replicate would compile one small program per shape.
  new_state, step_metrics = p_step(jax.tree.map(lambda x: np.asarray(x)[None], state), batch)

  ref_model = build_model(config, num_classes=3, in_channels=1)
  key = jax.random.fold_in(jax.random.fold_in(state.rng, 3), 0)
  onehot = jax.nn.one_hot(batch["label"][0], 3)

  def loss_fn(params):
    logits, upd = ref_model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      batch["image"][0],
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
    p = jax.nn.softmax(logits)
    focal = losses.focal_loss(p, onehot, loss_config["focal_alpha"], loss_config["focal_gamma"])
    dice = losses.dice_loss(p, onehot, (0.5, 1.0, 2.0))
    return dice + loss_config["focal_weight"] * focal, upd

  # Same compiler options as the step, so both sum in the same order; the step draws its dropout
  # masks with the classic threefry.
  with jax.threefry_partitionable(False):
    (loss, upd), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True), compiler_options=runtime.compiler_options()
    )(state.params)

  @jax.jit
  def adam_step(params, grads):
    tx = optax.adam(config.learning_rate)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  expected = adam_step(state.params, grads)
  got = jax.tree.map(lambda x: np.asarray(x)[0], new_state)
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
  assert int(got.step) == 4
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


@pytest.mark.slow
def test_two_devices_equal_one_device_with_the_same_global_batch(tmp_path):
  # vmap with the step's axis name runs the collectives pmap runs over devices (gradient and
  # metric means, Dice sums, BatchNorm statistics), in this process; the multi-host test runs
  # them over real devices.
  config = make_tiny_config(tmp_path, tmp_path, **ONE_LEVEL)
  model = build_model(config, num_classes=3, in_channels=1, bn_axis_name=train.AXIS)
  state = train.create_train_state(config, model)
  # SGD keeps gradient float noise at noise level (Adam would scale it up to a full step), so the
  # comparison below checks gradients, BatchNorm synchronisation and the Dice sums exactly.
  sgd = optax.sgd(0.1)
  state = state.replace(tx=sgd, opt_state=sgd.init(state.params))
  step = functools.partial(
    train.train_step,
    num_classes=3,
    loss_config=config.loss,
    weights=None,
    augmentation=augment.AugmentConfig.from_dict(config.augment),  # all off
    anisotropic=False,
  )
  rng = np.random.default_rng(0)
  batches = [_batch(rng, 1, 4, config.patch_size, 3) for _ in range(2)]
  results = []
  for n in (1, 2):
    v_step = jax.jit(jax.vmap(step, axis_name=train.AXIS))
    s = jax.tree.map(lambda x, n=n: np.stack([np.asarray(x)] * n), state)
    for b in batches:
      s, m = v_step(s, {k: v.reshape(n, 4 // n, *v.shape[2:]) for k, v in b.items()})
    results.append((jax.tree.map(lambda x: np.asarray(x)[0], s), m))
  (one, m1), (two, m2) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5), m1, m2)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, one.params, two.params)
  jax.tree.map(close, one.batch_stats, two.batch_stats)


def _main(*args: str, devices: int = 1, **popen) -> subprocess.Popen:
  # Started on huge pages already, so it does not restart itself (tests/test_cli.py tests that).
  env = subprocess_env(devices, GLIBC_TUNABLES=runtime.HUGE_PAGES_TUNABLE + "=1")
  return subprocess.Popen(
    [sys.executable, "-m", "vnet_jax.main", *args],
    env=env,
    cwd=ROOT,
    text=True,
    **popen,
  )


def run_main(*args: str, devices: int = 1, check: bool = True) -> subprocess.CompletedProcess:
  proc = _main(*args, devices=devices, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  stdout, stderr = proc.communicate(timeout=600)
  out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  if check:
    assert out.returncode == 0, stdout[-2000:] + stderr[-3000:]
  return out


@pytest.mark.slow
def test_missing_dataset_is_one_line_pointing_to_the_data(tmp_path):
  out = run_main(
    "--experiment=flare22",
    f"--workdir={tmp_path}/w",
    f"--data_dir={tmp_path}/FLARE22Train",
    check=False,
  )
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert (
    last.startswith("error: ")
    and "FLARE22Train" in last
    and "7860267" in last
    and "Traceback" not in out.stderr
  )


@pytest.mark.slow
def test_config_overrides_from_the_command_line_reach_the_run(tmp_path, tiny_dataset):
  # An optional (None) field and a tuple field; the run stops at validation of the fold index.
  out = run_main(
    "--experiment=seed",
    "--fold=7",
    f"--workdir={tmp_path}/w",
    f"--data_dir={tiny_dataset}",
    "--config.loss.class_weights=1,1,1,1",
    "--config.model.filters=8,16,32,64,64",
    f"--config.data.cache_dir={tmp_path}/cache",
    check=False,
  )
  assert out.returncode == 1 and "fold" in out.stderr.strip().splitlines()[-1]
  config = json.loads((tmp_path / "w" / "config.json").read_text())
  assert config["loss"]["class_weights"] == [1, 1, 1, 1]
  assert config["model"]["filters"] == [8, 16, 32, 64, 64]
  assert config["data"]["label_map"] == [[1, 1], [2, 2], [13, 2], [3, 3]]


# ---------------------------------------------------------------------------- end to end (slow)

# Enough steps for the tiny model to learn the larger organs: mean Dice 0.40 (liver 0.79) here,
# where zeroed gradients reach 0.008, labels shifted by 3 voxels 0.0 and labels shuffled within
# each patch 0.04. Noise augmentation draws random numbers: a resumed run must draw the same.
LEARNS = dict(
  num_steps=120,
  learning_rate=1e-2,
  eval_every=60,
  checkpoint_every=30,
  log_every=30,
  **{"augment.noise_prob": 0.5},
)


def train_flags(workdir, data_dir, cache_dir, **overrides) -> list[str]:
  return [
    "--experiment=flare22",
    "--fold=0",
    f"--workdir={workdir}",
    *tiny_flags(data_dir, cache_dir, **overrides),
  ]


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


def load_params(workdir, step=None):
  ckpt = Path(workdir) / "checkpoints"
  step = step or max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  return step, ocp.StandardCheckpointer().restore((ckpt / str(step) / "state").absolute())


@pytest.fixture
def no_report(monkeypatch):
  """For in-process runs whose report no test reads: making it takes seconds."""
  from vnet_jax import report

  monkeypatch.setattr(report, "make_report", lambda workdir: "not made in this test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset):
  """A run of `python -m vnet_jax.main` that learns: (workdir, cache_dir, its output)."""
  tmp = tmp_path_factory.mktemp("trained")
  out = run_main(*train_flags(tmp / "run", tiny_dataset, tmp / "cache", **LEARNS))
  return tmp / "run", tmp / "cache", out


@pytest.mark.slow
def test_main_trains_learns_and_writes_its_outputs(trained):
  work, _, out = trained
  assert "mean" in out.stdout and "liver" in out.stdout
  records = read_jsonl(work / "metrics.jsonl")
  assert [r["step"] for r in records] == [30, 60, 90, 120]
  for key in ("loss", "dice_loss", "focal_loss", "accuracy", "iou", "learning_rate", "steps_per_s"):
    assert all(np.isfinite(r[key]) for r in records), key
  config = json.loads((work / "config.json").read_text())
  assert config["num_steps"] == 120 and config["model"]["filters"] == [8, 16]
  summary = json.loads((work / "eval" / "summary.json").read_text())
  assert summary["step"] == 120
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
  # It learned: see LEARNS for what a working and a broken run reach.
  assert summary["mean_dice"] > 0.2 and summary["per_class"]["liver"]["dice"] > 0.5
  history = read_jsonl(work / "eval" / "history.jsonl")
  assert [h["step"] for h in history] == [60, 120]
  assert history[-1]["mean_dice"] == pytest.approx(summary["mean_dice"])
  splits = json.loads((work / "splits.json").read_text())
  assert [c["case"] for c in summary["per_case"]] == splits[0]["val"]
  # The latest 3 of every 30 steps; the best validated one (60 or 120) is among them.
  steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [60, 90, 120]
  assert list((work / "tensorboard").glob("events.out.tfevents.*"))
  assert (work / "plan.json").exists() and (work / "report.html").exists()
  assert (work / "plots" / "training_curves.png").exists()
  assert sorted(p.stem for p in (work / "eval" / "predictions").glob("*.npz")) == sorted(
    splits[0]["val"]
  )


@pytest.mark.slow
def test_eval_mode_scores_the_best_checkpoint_again(trained, tiny_dataset, tmp_path):
  source, cache, _ = trained
  work = tmp_path / "run"
  shutil.copytree(source, work)
  # Without its last checkpoint the run's latest one (90) was never validated; the best is 60.
  shutil.rmtree(work / "checkpoints" / "120")
  config = make_tiny_config(tiny_dataset, cache, **LEARNS)
  summary = train.train_and_evaluate(config, work, fold=0, mode="eval")
  (at_60,) = [h for h in read_jsonl(source / "eval" / "history.jsonl") if h["step"] == 60]
  assert summary["step"] == 60
  assert summary["mean_dice"] == pytest.approx(at_60["mean_dice"], abs=1e-6)
  assert json.loads((work / "eval" / "summary.json").read_text())["step"] == 60


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(trained, tiny_dataset, no_report, capsys):
  straight, cache, _ = trained
  # The same run cut at step 90 (its learning rate is constant), killed once its step-30
  # checkpoint is written, then run again: it must end where the straight run was at step 90.
  stop = 90
  work = straight.parent / "killed"
  args = train_flags(work, tiny_dataset, cache, **{**LEARNS, "num_steps": stop})
  proc = _main(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while (
    not (work / "checkpoints" / "30").exists() and time.time() < deadline and proc.poll() is None
  ):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at, _ = load_params(work)
  assert killed_at < stop, "the run finished before it could be killed"

  # Resumed in this process (the command line is tested above).
  config = make_tiny_config(tiny_dataset, cache, **{**LEARNS, "num_steps": stop})
  train.train_and_evaluate(config, work)
  # A run that ignored the checkpoints and started over would end with the same numbers.
  assert (
    f"resumed from {work.absolute() / 'checkpoints'} at step {killed_at}" in capsys.readouterr().out
  )
  _, a = load_params(straight, stop)
  step, b = load_params(work)
  assert step == stop
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_dataset):
  config = make_tiny_config(
    tiny_dataset, tmp_path / "cache", num_steps=12, checkpoint_every=1, learning_rate=1e30
  )
  with pytest.raises(TrainingError, match=r"non-finite loss .* at step \d+;") as e:
    train.train_and_evaluate(config, tmp_path / "run")
  bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
  last, params = load_params(tmp_path / "run")
  assert 1 < bad_step <= 12 and last == bad_step - 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_two_processes_of_two_devices_match_one_device_with_the_same_global_batch(
  tmp_path, tiny_dataset, no_report
):
  """Multi-host on loopback: gloo CPU collectives, each process reading its own shard."""
  # No BatchNorm: biases ahead of it have float-noise gradients that Adam scales up to a full step.
  steps = dict(num_steps=3, checkpoint_every=3, **{"model.batch_norm": False})
  import portpicker

  port = portpicker.pick_unused_port()
  work = tmp_path / "multi"
  procs = [
    _main(
      *train_flags(work, tiny_dataset, tmp_path / "cache", **steps),
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      devices=2,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for i in range(2)
  ]
  # The reference, meanwhile: this process, one device, a per-device batch of all 4 patches.
  single = make_tiny_config(tiny_dataset, tmp_path / "cache1", per_device_batch_size=4, **steps)
  expected_summary = train.train_and_evaluate(single, tmp_path / "single")
  outputs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(err[-2000:] for _, err in outputs)
  _, a = load_params(tmp_path / "single", 3)
  step, b = load_params(work)
  assert step == 3
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)
  # Each process kept its own data-iterator position.
  assert len(list((work / "checkpoints" / "3" / "data_iter").iterdir())) >= 2
  # The hosts split the validation cases and gathered every case's scores.
  dice = lambda s: {
    (c["case"], k): v["dice"] for c in s["per_case"] for k, v in c["per_class"].items()
  }
  summary = json.loads((work / "eval" / "summary.json").read_text())
  assert dice(summary) == pytest.approx(dice(expected_summary), abs=1e-6)
