"""Benchmarks: `train` and `infer` run end to end at tiny sizes and print their
documented JSON last."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vnet_jax import runtime

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ["--patch=16,32,32", "--filters=2,4,4,8,8"]

TRAIN_KEYS = {
  "bench",
  "device",
  "platform",
  "num_devices",
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
  "voxels_per_s",
  "flops_per_step",
  "achieved_flops_per_s",
  "peak_flops_per_s",
  "efficiency",
  "peak_device_memory_mb",
  "step_temp_memory_mb",
  "page_faults_per_step",
  "glibc_tunables",
  "loss",
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
  "tta",
  "windows",
  "setup_s",
  "compile_s",
  "preprocess_s",
  "sliding_window_s",
  "map_back_s",
  "total_s",
  "peak_rss_mb",
  "peak_device_memory_mb",
}


def _bench(*args: str) -> dict:
  # CPU even where a GPU is present: the test checks the output contract, not a device.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-m", "vnet_jax.bench", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The contract is the last line only: JAX and absl may log anything before it.
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_reports_step_time_flops_and_efficiency():
  r = _bench("train", *TINY_MODEL, "--steps=2", "--per_device_batch=1", "--matmul_n=512")
  assert r.keys() >= TRAIN_KEYS
  assert r["bench"] == "train" and r["patch"] == [16, 32, 32] and r["filters"] == [2, 4, 4, 8, 8]
  assert r["conv_impl"] in ("native", "depth_split")  # "auto" is reported resolved
  assert r["num_devices"] >= 1 and r["device"]
  assert r["compile_s"] > 0 and 0 < r["step_s"] < 60
  assert r["page_faults_per_step"] >= 0
  if sys.platform.startswith("linux") and runtime.HUGE_PAGES_TUNABLE not in os.environ.get(
    "GLIBC_TUNABLES", ""
  ):
    assert (
      f"{runtime.HUGE_PAGES_TUNABLE}=1" in r["glibc_tunables"]
    )  # the bench re-executed itself with huge pages
  # step_s is rounded to 0.1 ms in the JSON, voxels_per_s is not.
  assert r["voxels_per_s"] == pytest.approx(r["num_devices"] * 16 * 32 * 32 / r["step_s"], rel=0.05)
  assert r["flops_per_step"] > 0 and r["peak_flops_per_s"] > 0
  assert 0 < r["efficiency"] < 1.5
  assert r["peak_device_memory_mb"] is None or r["peak_device_memory_mb"] > 0
  assert math.isfinite(r["loss"])


def test_infer_reports_seconds_per_stage_and_rss():
  r = _bench("infer", *TINY_MODEL, "--shape=48,48,12")
  assert r.keys() >= INFER_KEYS
  assert r["bench"] == "infer" and r["shape"] == [48, 48, 12] and r["tta"] is False
  # Labels come back on the file's own voxel grid, whose axis order depends on its orientation.
  assert sorted(r["original_shape"]) == sorted([48, 48, 12])
  assert r["windows"] >= 1
  for stage in ("preprocess_s", "sliding_window_s", "map_back_s"):
    assert r[stage] > 0
  assert r["total_s"] >= r["sliding_window_s"]
  assert r["compile_s"] > 0 and r["peak_rss_mb"] > 50


def test_subcommand_is_required():
  proc = subprocess.run(
    [sys.executable, "-m", "vnet_jax.bench"], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode != 0 and "usage" in (proc.stdout + proc.stderr).lower()
