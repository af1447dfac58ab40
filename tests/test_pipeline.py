"""Grain training pipeline and patch sampling (`pipeline`, `patches`) on a tiny fake cache written
with np.save (no preprocessing code). Patches are plain crops, so streams differ only by where
each patch is cut: any mix-up of patch generators or order moves some crop."""

import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import grain
import numpy as np
import pytest
from absl import flags
from scipy import ndimage

from vnet_jax import checkpoint
from vnet_jax.data import patches, pipeline
from vnet_jax.errors import DataError

PATCH = (16, 16, 16)
BORDER = PATCH[0] // 2  # labels stay this far from the border: fg patches are exactly centred


def _write_case(root: Path, cid: str, shape, rng, dtype=np.float32, channels=1, border=BORDER):
  d = root / "cases" / cid
  d.mkdir(parents=True)
  field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
  field /= field.std()
  label = np.zeros(shape, np.uint8)
  label[field > 1.3] = 1
  label[field < -1.5] = 2
  inner = tuple(slice(border, s - border) for s in shape)
  keep = np.zeros(shape, bool)
  keep[inner] = True
  label[~keep] = 0
  image = np.stack([field + c for c in range(channels)], -1).astype(dtype)
  np.save(d / "image.npy", image)
  np.save(d / "label.npy", label)
  return image, label


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  root = tmp_path_factory.mktemp("cache")
  rng = np.random.default_rng(0)
  ids = []
  for i, shape in enumerate([(32, 32, 32), (24, 32, 28), (28, 24, 32), (32, 28, 24)]):
    _write_case(root, f"case_{i}", shape, rng)
    ids.append(f"case_{i}")
  return root, ids


def _batches(ds, n, state=None):
  it = iter(ds)
  try:
    if state is not None:
      it.set_state(state)
    return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]
  finally:
    it.close()


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def _make(cache, **kw):
  root, ids = cache
  args = dict(patch_size=PATCH, per_device_batch=2, num_local_devices=2, seed=7)
  args.update(kw)
  return pipeline.make_train_dataset(root, ids, **args)


def test_batch_shapes_and_dtypes(cache):
  (b,) = _batches(_make(cache, num_local_devices=3, per_device_batch=2), 1)
  assert b["image"].shape == (3, 2) + PATCH + (1,) and b["image"].dtype == np.float32
  assert b["label"].shape == (3, 2) + PATCH and b["label"].dtype == np.int32
  assert set(np.unique(b["label"])) <= {0, 1, 2}


def test_float16_multichannel_cache(tmp_path):
  rng = np.random.default_rng(1)
  _write_case(tmp_path, "a", (20, 20, 20), rng, dtype=np.float16, channels=2)
  ds = pipeline.make_train_dataset(
    tmp_path,
    ["a"],
    patch_size=PATCH,
    per_device_batch=1,
    num_local_devices=1,
    seed=0,
  )
  (b,) = _batches(ds, 1)
  assert b["image"].shape == (1, 1) + PATCH + (2,) and b["image"].dtype == np.float32
  np.testing.assert_allclose(b["image"][..., 1] - b["image"][..., 0], 1.0, atol=1e-2)


def test_patch_is_the_plain_crop_at_the_sampled_position(cache, monkeypatch):
  root, ids = cache
  starts = []
  patch_start = patches.PatchSampler.patch_start
  this_thread = threading.current_thread()

  def recording(self, shape, rng, centre=None):
    start = patch_start(self, shape, rng, centre)
    # Only this test's calls: a closed iterator's prefetch thread may still finish a patch.
    if threading.current_thread() is this_thread:
      starts.append(tuple(int(s) for s in start))
    return start

  monkeypatch.setattr(patches.PatchSampler, "patch_start", recording)
  ds = pipeline.make_patch_dataset(root, ids, patch_size=PATCH, seed=13)
  order = pipeline.EpochShuffle(grain.MapDataset.range(len(ids)), 13)
  for g in range(9):  # uniform and foreground-centred patches (g = 2, 5, 8)
    p = ds[g]
    assert len(starts) == g + 1
    case = ids[order[g]]
    image = np.load(root / "cases" / case / "image.npy")
    label = np.load(root / "cases" / case / "label.npy")
    box = tuple(slice(s, s + n) for s, n in zip(starts[-1], PATCH))
    assert p["image"].dtype == np.float32 and p["label"].dtype == np.uint8
    np.testing.assert_array_equal(p["image"], image[box])
    np.testing.assert_array_equal(p["label"], label[box])
  assert len(set(starts)) > 1


def test_small_volume_is_padded(tmp_path):
  rng = np.random.default_rng(2)
  image, label = _write_case(tmp_path, "small", (10, 12, 40), rng, border=0)
  image += 100.0  # every real voxel is far from the padding value 0
  np.save(tmp_path / "cases" / "small" / "image.npy", image)
  ds = pipeline.make_patch_dataset(tmp_path, ["small"], patch_size=PATCH, seed=3)
  for g in range(6):
    p = ds[g]
    real = p["image"][..., 0] != 0
    ds_, hs_, ws_ = (np.flatnonzero(real.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    assert len(ds_) == 10 and len(hs_) == 12 and len(ws_) == 16  # D, H padded; W cropped
    box = np.ix_(ds_, hs_, ws_)
    assert real[box].all() and real.sum() == 10 * 12 * 16
    assert (p["label"][~real] == 0).all()
    # The real region is the whole volume along D and H and a window along W.
    w0 = [
      w
      for w in range(40 - 16 + 1)
      if np.array_equal(p["image"][box][..., 0], image[:, :, w : w + 16, 0])
    ]
    assert len(w0) == 1
    np.testing.assert_array_equal(p["label"][box], label[:, :, w0[0] : w0[0] + 16])


def test_foreground_oversampling(cache):
  root, ids = cache
  centre = tuple(p // 2 for p in PATCH)

  def centre_classes(fraction, n=60):
    ds = pipeline.make_patch_dataset(
      root, ids, patch_size=PATCH, seed=11, foreground_fraction=fraction
    )
    return [int(ds[g]["label"][centre]) for g in range(n)]

  with_fg = centre_classes(1 / 3)
  without = centre_classes(0.0)
  assert sum(c > 0 for c in with_fg) >= 60 / 3
  assert sum(c > 0 for c in with_fg) > sum(c > 0 for c in without)
  assert {1, 2} <= set(with_fg)  # a random foreground class, not always the first
  # Locations were cached next to the cases, atomically (no temporary files left behind).
  files = sorted(p.name for p in (root / "cases" / ids[0]).iterdir())
  assert files == ["fg_locations.npz", "image.npy", "label.npy"]


def test_forced_patch_near_border_contains_the_voxel(tmp_path):
  rng = np.random.default_rng(4)
  _, label = _write_case(tmp_path, "b", (24, 24, 24), rng, border=0)
  label[:] = 0
  label[0, 23, 1] = 2  # a single corner voxel
  np.save(tmp_path / "cases" / "b" / "label.npy", label)
  ds = pipeline.make_patch_dataset(
    tmp_path, ["b"], patch_size=PATCH, seed=0, foreground_fraction=1.0
  )
  for g in range(3):
    assert (ds[g]["label"] == 2).sum() == 1


def test_determinism_and_seeds(cache):
  a = _batches(_make(cache, seed=5), 3)
  _assert_same(a, _batches(_make(cache, seed=5), 3))
  _assert_same(a, _batches(_make(cache, seed=5, read_threads=2, prefetch_buffer_size=4), 3))
  b = _batches(_make(cache, seed=6), 3)
  assert not np.array_equal(a[0]["image"], b[0]["image"])
  # Later batches differ from earlier ones too (the stream does not repeat a batch).
  assert not np.array_equal(a[0]["image"], a[1]["image"])
  # One case: the case order is fixed, so the seed must reach the crop positions themselves.
  root, ids = cache
  one = [_batches(_make((root, ids[:1]), seed=s), 1)[0]["image"] for s in (5, 6)]
  assert not np.array_equal(*one)


def test_process_sharding_union_equals_single_process(cache):
  single = _batches(_make(cache, num_local_devices=4, per_device_batch=1), 3)
  shards = [
    _batches(
      _make(cache, num_local_devices=2, per_device_batch=1, process_index=p, process_count=2), 3
    )
    for p in range(2)
  ]
  for step in range(3):
    for key in ("image", "label"):
      union = np.concatenate([shards[p][step][key] for p in range(2)], axis=0)
      np.testing.assert_array_equal(union, single[step][key])


def test_batches_hold_the_patch_stream_in_global_order(cache):
  root, ids = cache
  stream = pipeline.make_patch_dataset(root, ids, patch_size=PATCH, seed=7)
  local, devices, per_device = 4, 2, 2
  for p in range(2):
    got = _batches(_make(cache, process_index=p, process_count=2), 2)
    for step, batch in enumerate(got):
      for d, b in itertools.product(range(devices), range(per_device)):
        g = step * 2 * local + p * local + d * per_device + b
        np.testing.assert_array_equal(batch["image"][d, b], stream[g]["image"])
        np.testing.assert_array_equal(batch["label"][d, b], stream[g]["label"])


def test_state_round_trip(cache):
  ds = _make(cache)
  it = iter(ds)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [{k: np.array(v) for k, v in next(it).items()} for _ in range(2)]
  it.close()
  assert state == {"next_batch": 2}
  _assert_same(_batches(_make(cache), 2, state=state), expected)


@pytest.fixture()
def parsed_flags():
  # mp_prefetch reads absl flags; outside app.run they must be marked parsed.
  was = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  yield
  if not was:
    flags.FLAGS.unparse_flags()


@pytest.mark.slow
def test_workers_match_in_process_and_state_is_portable(cache, parsed_flags):
  in_process = _batches(_make(cache), 5)
  it = iter(_make(cache, num_workers=2))
  try:
    got = [{k: np.array(v) for k, v in next(it).items()} for _ in range(3)]
    state = it.get_state()
  finally:
    it.close()
  _assert_same(got, in_process[:3])
  # A state saved with 2 workers resumes in-process at the same batch.
  _assert_same(_batches(_make(cache, num_workers=0), 2, state=state), in_process[3:])


def test_iterator_position_round_trips_through_a_checkpoint(cache, tmp_path):
  it = iter(_make(cache))
  for _ in range(3):
    next(it)
  with checkpoint.make_manager(tmp_path) as mngr:
    checkpoint.save(mngr, 3, {"w": np.arange(3.0)}, data_iter=it)
    mngr.wait_until_finished()
    expected = [{k: np.array(v) for k, v in next(it).items()} for _ in range(2)]
    it.close()

    fresh = iter(_make(cache))
    try:
      state = checkpoint.restore(mngr, mngr.latest_step(), {"w": np.zeros(3)}, data_iter=fresh)
      assert fresh.get_state() == {"next_batch": 3}
      np.testing.assert_array_equal(state["w"], np.arange(3.0))
      got = [{k: np.array(v) for k, v in next(fresh).items()} for _ in range(2)]
    finally:
      fresh.close()
  _assert_same(got, expected)


def test_case_source_refuses_missing_cases(cache):
  root, ids = cache
  with pytest.raises(DataError, match="missing_case"):
    patches.CaseSource(root, ids + ["missing_case"])


def test_epoch_shuffle_visits_every_case_once_per_epoch():
  ds = pipeline.EpochShuffle(grain.MapDataset.range(5), seed=3)
  epochs = [[ds[e * 5 + i] for i in range(5)] for e in range(4)]
  assert all(sorted(e) == list(range(5)) for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1
  assert [ds[i] for i in range(10)] == [
    pipeline.EpochShuffle(grain.MapDataset.range(5), 3)[i] for i in range(10)
  ]


def test_is_foreground_patch_fraction():
  for f in (0.0, 1 / 3, 0.5, 0.25, 1.0):
    n = sum(patches.is_foreground_patch(g, f) for g in range(1200))
    assert n == round(1200 * f)
  assert list(
    itertools.islice((g for g in range(100) if patches.is_foreground_patch(g, 1 / 3)), 3)
  ) == [2, 5, 8]


@pytest.mark.slow
def test_bench_loader_prints_json_last():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "vnet_jax.bench",
      "loader",
      "--patch=16,16,16",
      "--volume=24,20,28",
      "--cases=2",
      "--batches=4",
      "--warmup=1",
    ],
    capture_output=True,
    text=True,
    check=True,
    cwd=Path(__file__).parent.parent,
    timeout=120,
  )
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["patch"] == [16, 16, 16] and result["workers"] == 0
  assert result["patches_per_s"] > 0 and result["patches_per_s_per_worker"] > 0
  assert result["batch_shapes"]["image"] == [1, 2, 16, 16, 16, 1]
