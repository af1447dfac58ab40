"""Benchmarks: every subcommand at a tiny size, its documented JSON last, the figures consistent
with each other and with what was asked for. XLA's optimisations are off wherever the speed of
the compiled code does not matter (most of these tests' time would be spent in them)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags

from vnet_jax import runtime, sliding_window, train
from vnet_jax.benchmarks import loader, machine, synthetic_cache, train_step
from vnet_jax.benchmarks.models import ModelSettings

ROOT = Path(__file__).resolve().parent.parent
# Two levels (the encoder's 32x32 slices use the slice-wise kernel gradients), few classes.
TINY_MODEL = ["--filters=2,4", "--num_classes=3"]

TRAIN_KEYS = {
  "bench",
  "device",
  "platform",
  "num_devices",
  "jax",
  "patch",
  "per_device_batch",
  "dtype",
  "filters",
  "num_classes",
  "conv_impl",
  "steps",
  "compile_s",
  "first_step_s",
  "step_s",
  "step_s_min",
  "step_s_max",
  "steps_per_s",
  "voxels_per_s",
  "flops_per_step",
  "achieved_flops_per_s",
  "peak_flops_per_s",
  "peak_matmul_n",
  "efficiency",
  "peak_device_memory_mb",
  "step_temp_memory_mb",
  "page_faults_per_step",
  "glibc_tunables",
  "loss",
  "profile_dir",
}
INFER_KEYS = {
  "bench",
  "device",
  "num_devices",
  "shape",
  "spacing",
  "target_spacing",
  "preprocessed_shape",
  "original_shape",
  "patch",
  "filters",
  "dtype",
  "conv_impl",
  "num_classes",
  "tta",
  "overlap",
  "windows",
  "cases",
  "setup_s",
  "compile_s",
  "preprocess_s",
  "sliding_window_s",
  "map_back_s",
  "write_s",
  "total_s",
  "s_per_case",
  "s_per_window",
  "peak_rss_mb",
  "peak_device_memory_mb",
}


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
  # CPU even where a GPU is present: the tests check the output contract, not a device.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", **env}
  return subprocess.run(
    [sys.executable, "-m", "vnet_jax.bench", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _bench(*args: str) -> dict:
  proc = _run(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The contract is the last line only: JAX and absl may log anything before it.
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def quick_compiles():
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.mark.slow
def test_train_reports_step_time_flops_and_efficiency():
  r = _bench(
    "train", *TINY_MODEL, "--patch=4,32,32", "--steps=2", "--per_device_batch=1", "--matmul_n=128"
  )
  assert r.keys() >= TRAIN_KEYS
  assert r["bench"] == "train" and r["patch"] == [4, 32, 32] and r["filters"] == [2, 4]
  assert r["steps"] == 2 and r["per_device_batch"] == 1 and r["num_classes"] == 3
  assert r["dtype"] == "float32" and r["peak_matmul_n"] == 128
  assert r["conv_impl"] == "depth_split"  # "auto" is reported resolved (on CPU)
  assert r["num_devices"] >= 1 and r["platform"] == "cpu" and r["device"]
  assert r["compile_s"] > 0 and r["first_step_s"] > 0
  assert 0 < r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
  # step_s is rounded to 0.1 ms in the JSON, the rates are not.
  voxels = r["num_devices"] * 4 * 32 * 32
  assert r["voxels_per_s"] == pytest.approx(voxels / r["step_s"], rel=0.05)
  assert r["flops_per_step"] > 0 and r["peak_flops_per_s"] > 0
  assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"], rel=0.05)
  assert r["efficiency"] == pytest.approx(
    r["achieved_flops_per_s"] / r["peak_flops_per_s"], abs=1e-4
  )
  assert r["step_temp_memory_mb"] is None or r["step_temp_memory_mb"] >= 0
  assert r["peak_device_memory_mb"] is None  # not reported on CPU
  assert r["page_faults_per_step"] >= 0 and r["profile_dir"] is None
  if sys.platform.startswith("linux") and runtime.HUGE_PAGES_TUNABLE not in os.environ.get(
    "GLIBC_TUNABLES", ""
  ):
    # The bench re-executed itself with huge pages (cli.run).
    assert f"{runtime.HUGE_PAGES_TUNABLE}=1" in r["glibc_tunables"]
  assert math.isfinite(r["loss"]) and r["loss"] > 0


@pytest.mark.slow
def test_train_counts_the_flops_of_the_step_without_its_loops(monkeypatch, quick_compiles):
  # XLA's cost analysis counts a loop's body once: the FLOPs must come from the step traced
  # without the slice-wise kernel-gradient loops, while the timed step keeps them.
  executables = []
  make_step = train.make_p_train_step

  def recording_make_step(*args, **kwargs):
    p_step = make_step(*args, **kwargs)
    compile_step = p_step.compile

    def compile_and_record(*args):
      executables.append(compile_step(*args))
      return executables[-1]

    p_step.compile = compile_and_record
    return p_step

  monkeypatch.setattr(train, "make_p_train_step", recording_make_step)
  monkeypatch.setattr(machine, "matmul_peak_flops", lambda dtype, n: 1e9)
  settings = ModelSettings(filters=(2, 4), conv_impl="depth_split")
  r = train_step.run(settings, (4, 32, 32), per_device_batch=1, num_classes=3, steps=1)
  timed, counted = executables
  # (Dropout's random bits are a loop in both.)
  loops = lambda executable: executable.as_text().count(" while(")
  assert loops(timed) > loops(counted)
  assert r["flops_per_step"] == machine.flops(counted) > machine.flops(timed)
  assert r["efficiency"] == pytest.approx(r["achieved_flops_per_s"] / 1e9, abs=1e-4)


@pytest.mark.slow
def test_infer_reports_seconds_per_case_and_stage_and_rss():
  r = _bench(
    "infer", *TINY_MODEL, "--patch=8,16,16", "--shape=48,48,12", "--overlap=0.25", "--cases=3"
  )
  assert r.keys() >= INFER_KEYS
  assert r["bench"] == "infer" and r["shape"] == [48, 48, 12] and r["tta"] is False
  assert r["spacing"] == [0.8, 0.8, 2.5] and r["target_spacing"] == [2.5, 1.0, 1.0]
  assert r["patch"] == [8, 16, 16] and r["filters"] == [2, 4] and r["overlap"] == 0.25
  assert r["num_classes"] == 14  # the synthetic dataset's background and 13 organs
  # Resampled to 2.5 x 1 x 1 mm (z, y, x) and cropped to the body: at most 12 x 38 x 38.
  d, h, w = r["preprocessed_shape"]
  assert d == 12 and 16 <= h <= 38 and 16 <= w <= 38
  # Labels come back on the file's own voxel grid, whose axis order depends on its orientation.
  assert sorted(r["original_shape"]) == sorted([48, 48, 12])
  windows = sliding_window.window_starts(r["preprocessed_shape"], (8, 16, 16), 0.25)
  assert r["windows"] == len(windows) > 1
  stages = ("preprocess_s", "sliding_window_s", "map_back_s", "write_s")
  assert all(r[stage] > 0 for stage in stages)
  assert r["total_s"] == pytest.approx(sum(r[stage] for stage in stages), abs=0.005)
  # Three cases in one predict run: each one's stages, less what the background thread hid.
  assert r["cases"] == 3 and 0 < r["s_per_case"] < 3 * r["total_s"]
  assert r["s_per_window"] == pytest.approx(r["sliding_window_s"] / r["windows"], abs=1e-3)
  assert r["setup_s"] > 0 and r["compile_s"] > 0 and r["peak_rss_mb"] > 50


def test_loader_reads_a_synthetic_cache_of_the_requested_volume(tmp_path):
  cache = synthetic_cache.write_volumes(tmp_path, 2, (12, 20, 28))
  assert len(cache.case_ids) == 2
  for case_id in cache.case_ids:
    image, label = cache.load_case(case_id)
    assert image.shape == (12, 20, 28, 1) and label.shape == (12, 20, 28)
    assert label.max() > 0 and np.isfinite(image).all()
  r = loader.run((8, 16, 16), per_device_batch=3, batches=2, warmup=1, cache_dir=str(cache.dir))
  assert r["bench"] == "loader" and r["cases"] == 2 and r["volume"] is None
  assert r["batch_shapes"] == {"image": [1, 3, 8, 16, 16, 1], "label": [1, 3, 8, 16, 16]}
  assert r["patches_per_s"] > 0 and r["patches_per_s_per_worker"] == r["patches_per_s"]
  for case_id in cache.case_ids:  # foreground locations are computed before the timing
    assert list(cache.case_dir(case_id).glob("fg_locations*"))


def test_usage_errors():
  from absl import app

  from vnet_jax import bench

  # Importing the command line defines no flags; only running it does.
  assert "matmul_n" not in flags.FLAGS
  for argv in (["bench"], ["bench", "fit"], ["bench", "train", "loader"]):
    with pytest.raises(app.UsageError, match="usage: python -m vnet_jax.bench"):
      bench.main(argv)
  with pytest.raises(app.UsageError, match="--patch=16,32: expected 3 positive integers"):
    bench._ints(["16", "32"], "patch")
  with pytest.raises(app.UsageError, match="--shape=4,x,4: expected 3 integers"):
    bench._ints(["4", "x", "4"], "shape")
  with pytest.raises(app.UsageError, match="--spacing=1,0,1: expected 3 positive numbers"):
    bench._floats(["1", "0", "1"], "spacing")


@pytest.mark.slow
def test_a_user_error_is_one_line(tmp_path):
  proc = _run("loader", f"--cache_dir={tmp_path}", "--nohuge_pages")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: {tmp_path}: not a complete preprocessed cache (plan.json missing)"
  )
