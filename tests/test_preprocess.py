"""Preprocessing: geometry round trip, normalisation statistics, the cache, resume, failures."""

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vnet_jax.data import preprocess as pp
from vnet_jax.data.layouts import discover_dataset
from vnet_jax.data.preprocess import PreprocessSettings
from vnet_jax.errors import DataError

# Voxel axis 0 -> Left (-x), 0.9 mm; axis 1 -> Superior (+z), 3.0 mm; axis 2 -> Posterior (-y),
# 1.1 mm: neither RAS nor (x, y, z) order, and anisotropic.
AFFINE = np.array(
  [[-0.9, 0, 0, 0.9 * 47 / 2], [0, 0, -1.1, 1.1 * 43 / 2], [0, 3.0, 0, -3.0 * 15 / 2], [0, 0, 0, 1]]
)
SHAPE = (48, 16, 44)
# (z, y, x) mm: finer on every axis, so the round trip loses no information. (Coarser targets
# lose up to a voxel at each boundary: Dice ~0.95 for these 15-30 voxel organs.)
TARGET = (2.0, 1.0, 0.75)


def _world(affine, shape):
  ijk = np.indices(shape).reshape(3, -1).astype(np.float64)
  return (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape((3,) + shape)


def _synth(shift=(0.0, 0.0, 0.0), seed=0, nan=False):
  """A smooth CT-like case: a body (40 HU) in air, two ellipsoid organs (30 and 60 HU)."""
  w = _world(AFFINE, SHAPE) - np.asarray(shift)[:, None, None, None]

  def r(radii, centre=(0.0, 0.0, 0.0)):
    return np.sqrt(sum(((w[i] - centre[i]) / radii[i]) ** 2 for i in range(3)))

  label = np.zeros(SHAPE, np.uint8)
  label[r((8.0, 13.0, 16.0), (-9.0, 0.0, 0.0)) < 1] = 1
  label[r((7.0, 10.0, 15.0), (9.0, 2.0, 0.0)) < 1] = 2
  rng = np.random.default_rng(seed)
  body = r((19.0, 20.0, 80.0)) < 1
  image = np.where(body, 40.0, -1000.0) + 30.0 * label + rng.normal(0, 5, SHAPE)
  image = image.astype(np.int16)
  if nan:
    image = image.astype(np.float32)
    image[5, 5, 5] = np.nan
  return image, label


def _write(root: Path, case_id: str, image, label, dirs=("images", "labels"), ending=".nii.gz"):
  for d in dirs:
    (root / d).mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(image, AFFINE), str(root / dirs[0] / f"{case_id}_0000{ending}"))
  nib.save(nib.Nifti1Image(label, AFFINE), str(root / dirs[1] / f"{case_id}{ending}"))


def _make_case(root: Path, case_id: str, **kw):
  image, label = _synth(**kw)
  _write(root, case_id, image, label)
  return image, label


@pytest.fixture(scope="module")
def flare_like(tmp_path_factory):
  root = tmp_path_factory.mktemp("flare") / "FLARE22Train"
  cases = {
    f"FLARE22_Tr_{k:04d}": _make_case(root, f"FLARE22_Tr_{k:04d}", shift=(k, -k, 2 * k), seed=k)
    for k in range(3)
  }
  return root, cases


@pytest.fixture(scope="module")
def prepared(flare_like, tmp_path_factory):
  root, cases = flare_like
  cache_root = tmp_path_factory.mktemp("cache")
  cached = pp.prepare_dataset(
    discover_dataset(root),
    PreprocessSettings(target_spacing=TARGET),
    cache_root,
    num_workers=2,
    progress=False,
  )
  return root, cases, cached


def _dice(a, b):
  return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


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


def test_preprocessed_grid_is_ras_zyx(prepared):
  _, cases, cached = prepared
  cid = cached.case_ids[1]
  meta = cached.load_meta(cid)
  a = np.asarray(meta["preprocessed_affine"])
  # index axes (z, y, x) point to world +S, +A, +R
  assert a[2, 0] > 0 and a[1, 1] > 0 and a[0, 2] > 0
  assert np.count_nonzero(np.abs(a[:3, :3]) > 1e-9) == 3
  # organ centroid in world coordinates agrees between original and preprocessed grids
  _, label = cases[cid]
  orig_c = AFFINE[:3, :3] @ np.argwhere(label == 2).mean(0) + AFFINE[:3, 3]
  pre_c = a[:3, :3] @ np.argwhere(np.asarray(cached.load_case(cid)[1]) == 2).mean(0) + a[:3, 3]
  np.testing.assert_allclose(pre_c, orig_c, atol=0.6)


def test_labels_and_probabilities_back_to_original(prepared, tmp_path):
  root, cases, cached = prepared
  for cid in cached.case_ids:
    _, label = cases[cid]
    meta = cached.load_meta(cid)
    pre = np.asarray(cached.load_case(cid)[1])
    back = pp.labels_to_original(pre, meta)
    assert back.shape == label.shape and back.dtype == np.uint8
    probs = np.eye(cached.num_classes, dtype=np.float16)[pre]
    from_probs = pp.probabilities_to_original(probs, meta)
    for c in (1, 2):
      assert _dice(back == c, label == c) > 0.98
      assert _dice(from_probs == c, label == c) > 0.98
    out = tmp_path / f"{cid}.nii.gz"
    pp.write_labels_nifti(out, back, meta)
    written, original = nib.load(str(out)), nib.load(str(root / "labels" / f"{cid}.nii.gz"))
    assert written.shape == original.shape
    np.testing.assert_array_equal(written.affine, original.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), back)


def test_probabilities_chunking_is_exact(prepared, monkeypatch):
  _, _, cached = prepared
  cid = cached.case_ids[0]
  meta = cached.load_meta(cid)
  rng = np.random.default_rng(1)
  probs = rng.random(tuple(meta["resampled_shape"]) + (3,)).astype(np.float32)
  whole = pp.probabilities_to_original(probs, meta)
  monkeypatch.setattr(pp, "_CHUNK_ELEMS", 97)  # many blocks of a few slices
  np.testing.assert_array_equal(pp.probabilities_to_original(probs, meta), whole)


def test_preprocess_image_matches_cache(prepared):
  root, _, cached = prepared
  cid = cached.case_ids[2]
  image, meta = pp.preprocess_image([root / "images" / f"{cid}_0000.nii.gz"], cached.plan)
  cached_meta = cached.load_meta(cid)
  assert meta["crop_box_zyx"] == cached_meta["crop_box_zyx"]  # organs lie inside the body
  assert image.dtype == np.float32
  np.testing.assert_allclose(image, cached.load_case(cid)[0], atol=1e-5)
  with pytest.raises(DataError, match="channel file"):
    pp.preprocess_image([], cached.plan)


def test_resample_matches_scipy_zoom():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 9, 11)).astype(np.float32)
  for out in [(5, 13, 11), (14, 4, 20)]:
    ref = ndimage.zoom(x, np.divide(out, x.shape), order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(pp.resample_linear(x, out), ref, atol=1e-5)
  # labels: per-class linear + argmax restricted to class boxes == the same on whole volumes
  lab = np.zeros((9, 10, 12), np.uint8)
  lab[2:6, 3:8, 1:5], lab[4:9, 1:4, 6:11], lab[5, 5, 5] = 1, 2, 3
  out = (13, 7, 17)
  onehot = np.stack(
    [
      ndimage.zoom(
        (lab == c).astype(np.float32),
        np.divide(out, lab.shape),
        order=1,
        grid_mode=True,
        mode="nearest",
      )
      for c in range(4)
    ]
  )
  got = pp.resample_labels(lab, out)
  top = onehot.max(0)
  assert np.all(onehot[got, *np.indices(out)] >= top - 1e-5)  # got is an argmax


def test_cache_reused_and_settings_change_hash(flare_like, tmp_path):
  root, _ = flare_like
  ds = discover_dataset(root)
  s = PreprocessSettings(target_spacing=(3.0, 1.5, 1.5))
  first = pp.prepare_dataset(ds, s, tmp_path, num_workers=0, progress=False)
  stamps = {p: p.stat().st_mtime_ns for p in first.dir.rglob("*")}
  again = pp.prepare_dataset(root, s, tmp_path, num_workers=0, progress=False)
  assert again.dir == first.dir
  assert {p: p.stat().st_mtime_ns for p in again.dir.rglob("*")} == stamps
  windowed = pp.prepare_dataset(
    ds,
    PreprocessSettings(target_spacing=(3.0, 1.5, 1.5), ct_window=(-160, 240)),
    tmp_path,
    num_workers=0,
    progress=False,
  )
  uncropped = pp.prepare_dataset(
    ds,
    PreprocessSettings(target_spacing=(3.0, 1.5, 1.5), crop_to_nonzero=False),
    tmp_path,
    num_workers=0,
    progress=False,
  )
  assert len({first.dir, windowed.dir, uncropped.dir}) == 3
  # a coarser grid loses sub-voxel detail but maps back aligned
  original = np.asarray(nib.load(str(ds.cases[0].label_file)).dataobj)
  back = pp.labels_to_original(
    np.asarray(first.load_case(ds.case_ids[0])[1]), first.load_meta(ds.case_ids[0])
  )
  assert _dice(back == 1, original == 1) > 0.9 and _dice(back == 2, original == 2) > 0.9
  assert windowed.plan["normalization"][0]["clip"] == [-160.0, 240.0]
  meta = uncropped.load_meta(ds.case_ids[0])
  assert meta["cropped_shape_zyx"] == meta["ras_shape_zyx"]
  assert pp.open_cache(first.dir).plan == first.plan


def test_file_change_changes_hash(tmp_path):
  root = tmp_path / "d"
  _make_case(root, "a")
  ds = discover_dataset(root)
  h1 = pp.cache_hash(ds, PreprocessSettings())
  f = root / "labels" / "a.nii.gz"
  os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
  assert pp.cache_hash(ds, PreprocessSettings()) != h1


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_resume_after_interruption(flare_like, tmp_path, monkeypatch):
  root, _ = flare_like
  ds = discover_dataset(root)
  s = PreprocessSettings(target_spacing=(3.0, 1.5, 1.5))
  reference = pp.prepare_dataset(ds, s, tmp_path / "ref", num_workers=0, progress=False)

  # Interrupted in pass 2: one case finished, one staged, plus a dead run's half-written dir.
  real_worker, calls = pp._worker, []

  def dying_worker(task):
    if task[0] == "finish":
      calls.append(task[1].case_id)
      if len(calls) == 2:
        raise KeyboardInterrupt
    return real_worker(task)

  monkeypatch.setattr(pp, "_worker", dying_worker)
  with pytest.raises(KeyboardInterrupt):
    pp.prepare_dataset(ds, s, tmp_path / "c", num_workers=0, progress=False)
  monkeypatch.setattr(pp, "_worker", real_worker)
  hdir = tmp_path / "c" / reference.dir.name
  assert not (hdir / "plan.json").exists() and (hdir / "plan.pending.json").exists()
  with pytest.raises(DataError, match="plan.json missing"):
    pp.open_cache(hdir)
  finished = sorted(p.name for p in (hdir / "cases").iterdir())
  assert finished == [calls[0]]
  leftover = hdir / ".tmp" / f"{calls[1]}__{socket.gethostname()}__{_dead_pid()}__deadbeef"
  leftover.mkdir(parents=True)
  (leftover / "image.npy").write_bytes(b"partial")
  stamp = (hdir / "cases" / calls[0] / "image.npy").stat().st_mtime_ns

  resumed = pp.prepare_dataset(ds, s, tmp_path / "c", num_workers=0, progress=False)
  assert not leftover.exists()
  assert (hdir / "cases" / calls[0] / "image.npy").stat().st_mtime_ns == stamp  # not redone
  assert resumed.plan["normalization"] == reference.plan["normalization"]
  for cid in ds.case_ids:
    for a, b in zip(resumed.load_case(cid), reference.load_case(cid)):
      np.testing.assert_array_equal(a, b)

  # A case directory lost after completion is rebuilt, the others are kept.
  shutil.rmtree(hdir / "cases" / ds.case_ids[1])
  with pytest.raises(DataError, match="incomplete"):
    pp.open_cache(hdir)
  again = pp.prepare_dataset(ds, s, tmp_path / "c", num_workers=0, progress=False)
  np.testing.assert_array_equal(
    again.load_case(ds.case_ids[1])[0], reference.load_case(ds.case_ids[1])[0]
  )
  assert (hdir / "cases" / calls[0] / "image.npy").stat().st_mtime_ns == stamp


def test_bad_case_leaves_nothing_trusted(tmp_path, monkeypatch):
  # spawn, as when JAX is already imported: tasks must pickle and workers import the module
  monkeypatch.setattr(pp, "_mp_context", lambda: multiprocessing.get_context("spawn"))
  root = tmp_path / "d"
  for k in range(3):
    _make_case(root, f"c{k}", seed=k, nan=(k == 1))
  cache_root = tmp_path / "cache"
  with pytest.raises(DataError) as e:
    pp.prepare_dataset(
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
      pp.open_cache(d)


def test_zscore_label_map_float16(tmp_path):
  root = tmp_path / "mr"
  root.mkdir()
  (root / "dataset.json").write_text(
    json.dumps(
      {
        "channel_names": {"0": "T2"},
        "labels": {"background": 0, "outer": 1, "inner": 2},
        "file_ending": ".nii",
      }
    )
  )
  originals = {}
  for k in range(2):
    image, label = _synth(seed=k)
    mr = np.where(image > -500, image + 1000.0, 0.0).astype(np.float32)  # air is 0
    _write(root, f"m{k}", mr, label, dirs=("imagesTr", "labelsTr"), ending=".nii")
    originals[f"m{k}"] = mr
  s = PreprocessSettings(image_dtype="float16", label_map=((1, 1), (2, 1)))
  cached = pp.prepare_dataset(root, s, tmp_path / "cache", num_workers=0, progress=False)
  assert cached.plan["normalization"][0]["scheme"] == "zscore"
  assert cached.class_names == {0: "background", 1: "outer+inner"}
  assert cached.num_classes == 2
  # default target spacing: median (z, y, x) spacing of the RAS-reoriented cases (no resampling)
  np.testing.assert_allclose(cached.target_spacing, (3.0, 1.1, 0.9), rtol=1e-6)
  for cid, mr in originals.items():
    image, label = cached.load_case(cid, mmap=False)
    assert image.dtype == np.float16 and set(np.unique(label)) == {0, 1}
    meta = cached.load_meta(cid)
    # z-score statistics of the case's body (nonzero) voxels
    (stats,) = meta["case_normalization"]
    body = mr[mr != 0].astype(np.float64)
    np.testing.assert_allclose([stats["mean"], stats["std"]], [body.mean(), body.std()], rtol=1e-5)
    # cropped to the body: each face of the crop box touches a body voxel
    assert meta["cropped_shape_zyx"] != meta["ras_shape_zyx"]
    full = np.zeros(meta["ras_shape_zyx"], bool)
    full[tuple(slice(*b) for b in meta["crop_box_zyx"])] = True
    ras_body = pp._to_ras_zyx(mr != 0, np.asarray(meta["ornt"]))
    assert not (ras_body & ~full).any()
    assert np.isfinite(np.asarray(image, np.float32)).all()


def test_settings_validation():
  with pytest.raises(ValueError):
    PreprocessSettings(target_spacing=(1.0, 1.0))
  with pytest.raises(ValueError):
    PreprocessSettings(normalization=("minmax",))
  with pytest.raises(ValueError):
    PreprocessSettings(ct_window=(100, -100))
  with pytest.raises(ValueError):
    PreprocessSettings(image_dtype="int8")
  s = PreprocessSettings(target_spacing=[2, 1, 1], label_map=[[2, 1], [1, 1]])
  assert s.target_spacing == (2.0, 1.0, 1.0) and s.label_map == ((1, 1), (2, 1))
  assert hash(s) == hash(
    PreprocessSettings(target_spacing=(2.0, 1.0, 1.0), label_map=((1, 1), (2, 1)))
  )


def test_stale_tmp_cleanup_spares_live_and_foreign_runs(tmp_path):
  host = socket.gethostname()
  dead = tmp_path / f"a__{host}__{_dead_pid()}__0001"
  live = tmp_path / f"b__{host}__{os.getpid()}__0002"
  foreign = tmp_path / "c__other-host__1__0003"
  old_foreign = tmp_path / "d__other-host__1__0004"
  for d in (dead, live, foreign, old_foreign):
    d.mkdir()
  os.utime(old_foreign, (0, 0))
  pp._clean_stale_tmp(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name])
