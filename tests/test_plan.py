"""Preprocessing settings, the plan's CT statistics and the cache hash."""

import os

import numpy as np
import pytest

from tests.nifti_cases import make_case
from vnet_jax.data import plan
from vnet_jax.data.layouts import discover_dataset
from vnet_jax.data.plan import PreprocessSettings
from vnet_jax.errors import DataError


def test_settings_validation():
  with pytest.raises(ValueError):
    PreprocessSettings(target_spacing=(1.0, 1.0))
  with pytest.raises(ValueError):
    PreprocessSettings(normalization=("minmax",))
  with pytest.raises(ValueError):
    PreprocessSettings(ct_window=(100, -100))
  with pytest.raises(ValueError):
    PreprocessSettings(image_dtype="int8")
  with pytest.raises(ValueError, match="twice"):
    PreprocessSettings(label_map=((1, 1), (1, 2)))
  s = PreprocessSettings(target_spacing=[2, 1, 1], label_map=[[2, 1], [1, 1]])
  assert s.target_spacing == (2.0, 1.0, 1.0) and s.label_map == ((1, 1), (2, 1))
  assert hash(s) == hash(
    PreprocessSettings(target_spacing=(2.0, 1.0, 1.0), label_map=((1, 1), (2, 1)))
  )
  assert s.to_json()["label_map"] == [[1, 1], [2, 1]]


def test_default_normalization():
  assert [plan.default_normalization(n) for n in ("CT", " ct", "noNorm", "none", "T2")] == [
    "ct",
    "ct",
    "none",
    "none",
    "zscore",
  ]


def _ct_plan(clip=None):
  norm = {"channel": 0, "name": "CT", "scheme": "ct", "clip": clip, "mean": None, "std": None}
  return {"dataset_root": "/data", "normalization": [norm]}


def test_compute_ct_stats_from_staged_samples(tmp_path):
  rng = np.random.default_rng(0)
  samples = {"a": rng.normal(50, 30, 400), "b": rng.normal(80, 10, 300)}
  for cid, s in samples.items():
    (tmp_path / cid).mkdir()
    np.save(tmp_path / cid / "fg_samples_0.npy", s.astype(np.float32))
  vals = np.concatenate([s.astype(np.float32) for s in samples.values()]).astype(np.float64)
  pending = _ct_plan()
  assert not plan.ct_stats_known(pending)
  (n,) = plan.compute_ct_stats(pending, tmp_path, ["a", "b", "missing"])["normalization"]
  assert pending["normalization"][0]["mean"] is None  # the input plan is left as it was
  np.testing.assert_allclose(n["clip"], np.percentile(vals, [0.5, 99.5]))
  clipped = np.clip(vals, *n["clip"])
  np.testing.assert_allclose([n["mean"], n["std"]], [clipped.mean(), clipped.std()])
  assert n["num_samples"] == 700
  (w,) = plan.compute_ct_stats(_ct_plan([0.0, 60.0]), tmp_path, ["a", "b"])["normalization"]
  assert w["clip"] == [0.0, 60.0]
  np.testing.assert_allclose(w["mean"], np.clip(vals, 0, 60).mean())
  assert plan.ct_stats_known({"normalization": [w]})
  with pytest.raises(DataError, match="no foreground"):
    plan.compute_ct_stats(_ct_plan(), tmp_path, ["missing"])


def test_file_change_changes_hash(tmp_path):
  root = tmp_path / "d"
  make_case(root, "a")
  ds = discover_dataset(root)
  h1 = plan.cache_hash(ds, PreprocessSettings())
  assert plan.cache_hash(discover_dataset(root), PreprocessSettings()) == h1
  assert plan.cache_hash(ds, PreprocessSettings(crop_to_nonzero=False)) != h1
  f = root / "labels" / "a.nii.gz"
  os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
  assert plan.cache_hash(ds, PreprocessSettings()) != h1
