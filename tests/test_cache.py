"""The preprocessed cache: layout, dataset statistics, reuse, resume, failures, case loading."""

import multiprocessing
import os
import shutil
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.nifti_cases import TARGET, dice, make_case, make_flare_like
from vnet_jax.data import cache as cache_lib
from vnet_jax.data.layouts import discover_dataset
from vnet_jax.data.plan import PreprocessSettings
from vnet_jax.data.preprocess import labels_to_original
from vnet_jax.errors import DataError


@pytest.fixture(scope="module")
def flare_like(tmp_path_factory):
  root = tmp_path_factory.mktemp("flare") / "FLARE22Train"
  return root, make_flare_like(root)


@pytest.fixture(scope="module")
def prepared(flare_like, tmp_path_factory):
  root, cases = flare_like
  cached = cache_lib.prepare_dataset(
    discover_dataset(root),
    PreprocessSettings(target_spacing=TARGET),
    tmp_path_factory.mktemp("cache"),
    num_workers=2,  # the process pool
    progress=False,
  )
  return root, cases, cached


def test_cache_layout_and_plan(prepared):
  root, cases, cached = prepared
  assert cached.case_ids == tuple(sorted(cases))
  assert cached.num_channels == 1 and cached.num_classes == 14
  assert cached.class_names[1] == "liver"
  assert (cached.dir / "plan.json").is_file()
  assert not (cached.dir / ".stage").exists() and not (cached.dir / ".tmp").exists()
  image, label = cached.load_case(cached.case_ids[0])
  assert isinstance(image, np.memmap) and image.ndim == 4 and image.shape[-1] == 1
  assert label.dtype == np.uint8 and label.shape == image.shape[:3]
  meta = cached.load_meta(cached.case_ids[0])
  assert list(label.shape) == meta["resampled_shape"]
  np.testing.assert_allclose(meta["resampled_spacing"], TARGET, rtol=0.1)
  counts = np.bincount(np.asarray(label).ravel())
  assert meta["class_voxels"] == {str(c): int(n) for c, n in enumerate(counts) if n}


def test_ct_statistics_are_foreground_percentiles(prepared):
  _, cases, cached = prepared
  fg = np.concatenate([img[lab > 0].astype(np.float64) for img, lab in cases.values()])
  (norm,) = cached.plan["normalization"]
  assert norm["scheme"] == "ct"
  np.testing.assert_allclose(norm["clip"], np.percentile(fg, [0.5, 99.5]), rtol=1e-6)
  clipped = np.clip(fg, *norm["clip"])
  np.testing.assert_allclose(
    [norm["mean"], norm["std"]], [clipped.mean(), clipped.std()], rtol=1e-6
  )
  # applied: foreground of the cached image is ~zero-mean, unit-std
  vals = np.concatenate(
    [
      np.asarray(cached.load_case(c)[0])[..., 0][np.asarray(cached.load_case(c)[1]) > 0]
      for c in cached.case_ids
    ]
  )
  assert abs(vals.mean()) < 0.2 and 0.5 < vals.std() < 1.5


def test_cache_reused_and_settings_change_hash(flare_like, tmp_path):
  root, _ = flare_like
  ds = discover_dataset(root)
  s = PreprocessSettings(target_spacing=(3.0, 1.5, 1.5))
  first = cache_lib.prepare_dataset(ds, s, tmp_path, num_workers=0, progress=False)
  stamps = {p: p.stat().st_mtime_ns for p in first.dir.rglob("*")}
  again = cache_lib.prepare_dataset(root, s, tmp_path, num_workers=0, progress=False)
  assert again.dir == first.dir
  assert {p: p.stat().st_mtime_ns for p in again.dir.rglob("*")} == stamps
  windowed = cache_lib.prepare_dataset(
    ds,
    PreprocessSettings(target_spacing=(3.0, 1.5, 1.5), ct_window=(-160, 240)),
    tmp_path,
    num_workers=0,
    progress=False,
  )
  uncropped = cache_lib.prepare_dataset(
    ds,
    PreprocessSettings(target_spacing=(3.0, 1.5, 1.5), crop_to_nonzero=False),
    tmp_path,
    num_workers=0,
    progress=False,
  )
  assert len({first.dir, windowed.dir, uncropped.dir}) == 3
  # a coarser grid loses sub-voxel detail but maps back aligned
  original = np.asarray(nib.load(str(ds.cases[0].label_file)).dataobj)
  back = labels_to_original(
    np.asarray(first.load_case(ds.case_ids[0])[1]), first.load_meta(ds.case_ids[0])
  )
  assert dice(back == 1, original == 1) > 0.9 and dice(back == 2, original == 2) > 0.9
  assert windowed.plan["normalization"][0]["clip"] == [-160.0, 240.0]
  meta = uncropped.load_meta(ds.case_ids[0])
  assert meta["cropped_shape_zyx"] == meta["ras_shape_zyx"]
  assert cache_lib.open_cache(first.dir).plan == first.plan


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_resume_after_interruption(flare_like, tmp_path, monkeypatch):
  root, _ = flare_like
  ds = discover_dataset(root)
  s = PreprocessSettings(target_spacing=(3.0, 1.5, 1.5))
  reference = cache_lib.prepare_dataset(ds, s, tmp_path / "ref", num_workers=0, progress=False)

  # Interrupted in pass 2: one case finished, one staged, plus a dead run's half-written dir.
  real_worker, calls = cache_lib._worker, []

  def dying_worker(task):
    if task[0] == "finish":
      calls.append(task[1].case_id)
      if len(calls) == 2:
        raise KeyboardInterrupt
    return real_worker(task)

  monkeypatch.setattr(cache_lib, "_worker", dying_worker)
  with pytest.raises(KeyboardInterrupt):
    cache_lib.prepare_dataset(ds, s, tmp_path / "c", num_workers=0, progress=False)
  monkeypatch.setattr(cache_lib, "_worker", real_worker)
  hdir = tmp_path / "c" / reference.dir.name
  assert not (hdir / "plan.json").exists() and (hdir / "plan.pending.json").exists()
  with pytest.raises(DataError, match="plan.json missing"):
    cache_lib.open_cache(hdir)
  finished = sorted(p.name for p in (hdir / "cases").iterdir())
  assert finished == [calls[0]]
  leftover = hdir / ".tmp" / f"{calls[1]}__{socket.gethostname()}__{_dead_pid()}__deadbeef"
  leftover.mkdir(parents=True)
  (leftover / "image.npy").write_bytes(b"partial")
  stamp = (hdir / "cases" / calls[0] / "image.npy").stat().st_mtime_ns

  resumed = cache_lib.prepare_dataset(ds, s, tmp_path / "c", num_workers=0, progress=False)
  assert not leftover.exists()
  assert (hdir / "cases" / calls[0] / "image.npy").stat().st_mtime_ns == stamp  # not redone
  assert resumed.plan["normalization"] == reference.plan["normalization"]
  for cid in ds.case_ids:
    for a, b in zip(resumed.load_case(cid), reference.load_case(cid)):
      np.testing.assert_array_equal(a, b)

  # A case directory lost after completion is rebuilt, the others are kept.
  shutil.rmtree(hdir / "cases" / ds.case_ids[1])
  with pytest.raises(DataError, match="incomplete"):
    cache_lib.open_cache(hdir)
  again = cache_lib.prepare_dataset(ds, s, tmp_path / "c", num_workers=0, progress=False)
  np.testing.assert_array_equal(
    again.load_case(ds.case_ids[1])[0], reference.load_case(ds.case_ids[1])[0]
  )
  assert (hdir / "cases" / calls[0] / "image.npy").stat().st_mtime_ns == stamp


def test_bad_case_leaves_nothing_trusted(tmp_path, monkeypatch):
  # spawn, as when JAX is already imported: tasks must pickle and workers import the module
  monkeypatch.setattr(cache_lib, "_mp_context", lambda: multiprocessing.get_context("spawn"))
  root = tmp_path / "d"
  for k in range(3):
    make_case(root, f"c{k}", seed=k, nan=(k == 1))
  cache_root = tmp_path / "cache"
  with pytest.raises(DataError) as e:
    cache_lib.prepare_dataset(
      discover_dataset(root),
      PreprocessSettings(target_spacing=(3.0, 1.5, 1.5)),
      cache_root,
      num_workers=2,
      progress=False,
    )
  msg = str(e.value)
  assert msg.startswith(str(root / "images" / "c1_0000.nii.gz")) and "NaN" in msg
  assert not list(cache_root.rglob("plan.json"))
  assert not list(cache_root.rglob("c1"))
  for d in cache_root.glob("*"):
    with pytest.raises(DataError):
      cache_lib.open_cache(d)


def test_stale_tmp_cleanup_spares_live_and_foreign_runs(tmp_path):
  host = socket.gethostname()
  dead = tmp_path / f"a__{host}__{_dead_pid()}__0001"
  live = tmp_path / f"b__{host}__{os.getpid()}__0002"
  foreign = tmp_path / "c__other-host__1__0003"
  old_foreign = tmp_path / "d__other-host__1__0004"
  for d in (dead, live, foreign, old_foreign):
    d.mkdir()
  os.utime(old_foreign, (0, 0))
  cache_lib._clean_stale_tmp(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name])


def _save_case(root, cid, image, label):
  d = cache_lib.case_dir(root, cid)
  d.mkdir(parents=True)
  if image is not None:
    np.save(d / "image.npy", image)
  if label is not None:
    np.save(d / "label.npy", label)


def test_load_case_checks_arrays(tmp_path):
  image = np.random.default_rng(0).random((4, 5, 6, 2)).astype(np.float16)
  label = np.arange(120, dtype=np.uint8).reshape(4, 5, 6) % 3
  _save_case(tmp_path, "good", image, label)
  got_image, got_label = cache_lib.load_case(tmp_path, "good")
  assert isinstance(got_image, np.memmap) and isinstance(got_label, np.memmap)
  np.testing.assert_array_equal(got_image, image)
  np.testing.assert_array_equal(got_label, label)
  in_memory = cache_lib.load_case(tmp_path, "good", mmap=False)[0]
  assert not isinstance(in_memory, np.memmap)
  _save_case(tmp_path, "shape", image, label[:, :, :5])
  _save_case(tmp_path, "dtype", image.astype(np.float64), label)
  _save_case(tmp_path, "float_label", image, label.astype(np.float32))
  _save_case(tmp_path, "no_label", image, None)
  for cid, match in [
    ("shape", "shape/label.npy: expected integer"),
    ("dtype", "dtype/image.npy: expected"),
    ("float_label", "float_label/label.npy"),
    ("no_label", "no_label/label.npy: missing"),
    ("absent", "absent/image.npy: missing"),
  ]:
    with pytest.raises(DataError, match=match):
      cache_lib.load_case(tmp_path, cid)
  (cache_lib.case_dir(tmp_path, "dtype") / "image.npy").write_bytes(b"not an array")
  with pytest.raises(DataError, match="unreadable"):
    cache_lib.load_case(tmp_path, "dtype")
