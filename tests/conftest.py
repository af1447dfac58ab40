"""Shared fixtures: a tiny synthetic FLARE22-layout dataset, a tiny training config, and the
environment of the tests' subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

# The tests check numbers and behaviour, not speed, and XLA:CPU compilation dominates their time:
# its cheapest settings (no LLVM optimisation, the older fusion emitters) compile the tiny models
# 3-6x faster. Set before JAX is imported, so every subprocess a test starts inherits them.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
_TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if _TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_TEST_XLA_FLAGS}".strip()

import pytest  # noqa: E402

from vnet_jax.experiments import base  # noqa: E402

TINY_SHAPE = (40, 40, 12)  # (x, y, z) voxels: small enough to train in seconds on a CPU
# Augmentation off (a test that wants some switches it on): each stage compiles with the step.
_NO_AUGMENTATION = {f"augment.{k}": 0.0 for k in base.get_config().augment if k.endswith("_prob")}
TINY = {
  "data.target_spacing": (4.0, 2.0, 2.0),
  "data.preprocess_workers": 0,
  "num_folds": 3,
  "num_steps": 4,
  "per_device_batch_size": 1,
  "patch_size": (8, 16, 16),
  "model.filters": (8, 16),  # two levels: compiles in a second or two, still learns
  "model.dropout_rate": 0.0,
  "log_every": 1,
  "eval_every": 1000,
  "checkpoint_every": 2,
  **_NO_AUGMENTATION,
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  from vnet_jax.data import synthetic  # here: subprocesses import this module too

  out = tmp_path_factory.mktemp("flare22_tiny")
  synthetic.write_dataset(out, 6, layout="flare22", seed=3, shape=TINY_SHAPE)
  return out


def make_tiny_config(data_dir, cache_dir, **overrides):
  """The base config shrunk to TINY; overrides use dotted names with '__' for '.'."""
  c = base.get_config()
  values = {
    "data.data_dir": str(data_dir),
    "data.cache_dir": str(cache_dir),
    **TINY,
    **{k.replace("__", "."): v for k, v in overrides.items()},
  }
  for key, value in values.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def tiny_flags(data_dir, cache_dir, **overrides) -> list[str]:
  """The same tiny config as command-line flags for `python -m vnet_jax.main`."""
  values = {
    "data.cache_dir": cache_dir,
    **TINY,
    **{k.replace("__", "."): v for k, v in overrides.items()},
  }
  fmt = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
  return [f"--data_dir={data_dir}"] + [f"--config.{k}={fmt(v)}" for k, v in values.items()]


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """Environment of a test's Python subprocess: `devices` CPU devices, this checkout first on
  the path, the test compiler settings above."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return {
    **os.environ,
    "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    **extra,
  }


def run_module(module: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
  """`python -m module args...` from the repository root, output captured as text."""
  kwargs = {"cwd": Path(__file__).resolve().parent.parent, "timeout": 120, **kwargs}
  return subprocess.run(
    [sys.executable, "-m", module, *args], capture_output=True, text=True, **kwargs
  )
