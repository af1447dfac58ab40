"""The per-case transform: RAS (z, y, x) grid, mapping back, prediction-time preprocessing,
z-score normalisation, label maps."""

import json

import nibabel as nib
import numpy as np
import pytest

from tests.nifti_cases import AFFINE, TARGET, dice, make_flare_like, synth, write
from vnet_jax.data import preprocess as pp
from vnet_jax.data import resample
from vnet_jax.data.cache import prepare_dataset
from vnet_jax.data.geometry import to_ras_zyx
from vnet_jax.data.layouts import discover_dataset
from vnet_jax.data.plan import PreprocessSettings
from vnet_jax.errors import DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("flare") / "FLARE22Train"
  cases = make_flare_like(root)
  cached = prepare_dataset(
    discover_dataset(root),
    PreprocessSettings(target_spacing=TARGET),
    tmp_path_factory.mktemp("cache"),
    num_workers=0,
    progress=False,
  )
  return root, cases, cached


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
      assert dice(back == c, label == c) > 0.98
      assert dice(from_probs == c, label == c) > 0.98
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
  monkeypatch.setattr(resample, "CHUNK_ELEMS", 97)  # many blocks of a few slices
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
    image, label = synth(seed=k)
    mr = np.where(image > -500, image + 1000.0, 0.0).astype(np.float32)  # air is 0
    write(root, f"m{k}", mr, label, dirs=("imagesTr", "labelsTr"), ending=".nii")
    originals[f"m{k}"] = mr
  s = PreprocessSettings(image_dtype="float16", label_map=((1, 1), (2, 1)))
  cached = prepare_dataset(root, s, tmp_path / "cache", num_workers=0, progress=False)
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
    ras_body = to_ras_zyx(mr != 0, np.asarray(meta["ornt"]))
    assert not (ras_body & ~full).any()
    assert np.isfinite(np.asarray(image, np.float32)).all()
