"""Shared fixtures: a tiny synthetic FLARE22-layout dataset and a tiny training config."""

import jax
import pytest

from vnet_jax.data import synthetic
from vnet_jax.experiments import base

# Tests initialise many small models: the classic threefry compiles ~4x faster on XLA:CPU than the
# partitionable one (train.create_train_state makes the same choice for its one initialisation).
jax.config.update("jax_threefry_partitionable", False)

TINY_SHAPE = (40, 40, 12)  # (x, y, z) voxels: small enough to train in seconds on a CPU
TINY = {
  "data.target_spacing": (4.0, 2.0, 2.0),
  "data.preprocess_workers": 0,
  "num_folds": 3,
  "num_steps": 4,
  "per_device_batch_size": 1,
  "patch_size": (16, 32, 32),
  "model.filters": (2, 4, 4, 8, 8),
  "model.dropout_rate": 0.0,
  "log_every": 1,
  "eval_every": 1000,
  "checkpoint_every": 2,
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
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
