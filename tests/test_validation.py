"""Header and content checks: every failure is a one-line DataError naming the bad file."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vnet_jax.data import validation
from vnet_jax.data.layouts import discover_dataset
from vnet_jax.errors import DataError

SHAPE = (6, 7, 8)
AFFINE = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 50.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def _save(path: Path, data: np.ndarray, affine=AFFINE):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine), str(path))
  return path


def _dataset(root: Path, n=3, channels=1, ending=".nii.gz"):
  """nnU-Net v2 dataset with classes 0..2 and valid, consistent files."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "dataset.json").write_text(
    json.dumps(
      {
        "channel_names": {str(i): f"MR{i}" for i in range(channels)},
        "labels": {"background": 0, "a": 1, "b": 2},
        "file_ending": ending,
      }
    )
  )
  rng = np.random.default_rng(0)
  for k in range(n):
    for ch in range(channels):
      _save(root / "imagesTr" / f"c{k}_{ch:04d}{ending}", rng.normal(size=SHAPE).astype(np.float32))
    _save(root / "labelsTr" / f"c{k}{ending}", rng.integers(0, 3, SHAPE).astype(np.uint8))
  return root


def _fails(dataset_root: Path, bad_file: Path, match: str, **kw):
  ds = discover_dataset(dataset_root)
  with pytest.raises(DataError, match=match) as e:
    validation.validate_dataset(ds, **kw)
  msg = str(e.value)
  assert msg.startswith(f"{bad_file}: "), msg
  assert "\n" not in msg
  return msg


def test_valid_dataset_headers(tmp_path):
  root = _dataset(tmp_path / "d", channels=2)
  headers = validation.validate_dataset(
    discover_dataset(root), num_folds=3, fold=2, check_content=True
  )
  h = headers["c1"]
  assert h.shape == SHAPE
  np.testing.assert_allclose(h.affine, AFFINE)
  # LPS-ish affine (x, y flipped) reoriented to RAS, then (z, y, x)
  np.testing.assert_allclose(h.spacing_zyx, (2.5, 0.8, 0.8), rtol=1e-6)
  assert h.shape_zyx == (8, 7, 6)


def test_truncated_gzip_header(tmp_path):
  root = _dataset(tmp_path / "d")
  f = root / "imagesTr" / "c1_0000.nii.gz"
  f.write_bytes(f.read_bytes()[:30])
  _fails(root, f, "cannot read NIfTI header")


def test_truncated_gzip_data_found_when_read(tmp_path):
  root = _dataset(tmp_path / "d")
  f = root / "imagesTr" / "c2_0000.nii.gz"
  raw = f.read_bytes()
  f.write_bytes(raw[: len(raw) * 2 // 3])
  validation.validate_dataset(discover_dataset(root))  # header still readable
  _fails(root, f, "cannot read image data", check_content=True)


def test_truncated_uncompressed_found_from_header(tmp_path):
  root = _dataset(tmp_path / "d", ending=".nii")
  f = root / "labelsTr" / "c0.nii"
  f.write_bytes(f.read_bytes()[:-40])
  _fails(root, f, "truncated")


def test_4d_image(tmp_path):
  root = _dataset(tmp_path / "d")
  f = _save(root / "imagesTr" / "c0_0000.nii.gz", np.zeros(SHAPE + (2,), np.float32))
  msg = _fails(root, f, "4D image")
  assert "one file per channel" in msg


def test_trailing_singleton_axis_is_3d(tmp_path):
  root = _dataset(tmp_path / "d")
  _save(root / "imagesTr" / "c0_0000.nii.gz", np.zeros(SHAPE + (1,), np.float32))
  assert validation.validate_dataset(discover_dataset(root))["c0"].shape == SHAPE


def test_label_shape_mismatch(tmp_path):
  root = _dataset(tmp_path / "d")
  f = _save(root / "labelsTr" / "c1.nii.gz", np.zeros((6, 7, 9), np.uint8))
  _fails(root, f, r"label shape \(6, 7, 9\) differs")


def test_channel_shape_mismatch(tmp_path):
  root = _dataset(tmp_path / "d", channels=2)
  f = _save(root / "imagesTr" / "c0_0001.nii.gz", np.zeros((5, 7, 8), np.float32))
  _fails(root, f, "differs from channel 0")


def test_label_affine_mismatch(tmp_path):
  root = _dataset(tmp_path / "d")
  shifted = AFFINE.copy()
  shifted[0, 3] += 0.4  # half a voxel
  f = _save(root / "labelsTr" / "c2.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
  _fails(root, f, "label affine differs")


def test_affine_within_tolerance_passes(tmp_path):
  root = _dataset(tmp_path / "d")
  near = AFFINE.copy()
  near[0, 3] += 1e-5
  near[2, 2] *= 1 + 1e-5
  _save(root / "labelsTr" / "c2.nii.gz", np.zeros(SHAPE, np.uint8), near)
  validation.validate_dataset(discover_dataset(root))


def test_undeclared_label_value(tmp_path):
  root = _dataset(tmp_path / "d")
  lab = np.zeros(SHAPE, np.uint8)
  lab[2, 2, 2] = 20
  f = _save(root / "labelsTr" / "c1.nii.gz", lab)
  msg = _fails(root, f, "not declared", check_content=True)
  assert "[20]" in msg


def test_non_integer_label(tmp_path):
  root = _dataset(tmp_path / "d")
  lab = np.zeros(SHAPE, np.float32)
  lab[1, 1, 1] = 1.5
  f = _save(root / "labelsTr" / "c0.nii.gz", lab)
  _fails(root, f, "non-integer", check_content=True)


def test_nan_intensity(tmp_path):
  root = _dataset(tmp_path / "d", channels=2)
  img = np.zeros(SHAPE, np.float32)
  img[3, 4, 5] = np.nan
  img[0, 0, 0] = np.inf
  f = _save(root / "imagesTr" / "c2_0001.nii.gz", img)
  msg = _fails(root, f, "NaN/inf", check_content=True)
  assert msg.split(": ")[1].startswith("2 ")


def test_check_case_content_directly(tmp_path):
  root = _dataset(tmp_path / "d")
  case = discover_dataset(root).cases[0]
  images, label = validation.read_case_arrays(case)
  values = validation.check_case_content(case, images, label, {0: "bg", 1: "a", 2: "b"})
  assert set(values.tolist()) <= {0, 1, 2}
  with pytest.raises(DataError, match=str(case.label_file)):
    validation.check_case_content(case, images, label, [0, 1])  # 2 not declared here


def test_image_or_label_missing(tmp_path):
  root = _dataset(tmp_path / "d")
  (root / "labelsTr" / "c1.nii.gz").unlink()
  with pytest.raises(DataError, match="image without label") as e:
    discover_dataset(root)
  assert str(root / "imagesTr" / "c1_0000.nii.gz") in str(e.value)
  _save(root / "labelsTr" / "c1.nii.gz", np.zeros(SHAPE, np.uint8))
  (root / "imagesTr" / "c0_0000.nii.gz").unlink()
  with pytest.raises(DataError, match="label without image") as e:
    discover_dataset(root)
  assert str(root / "labelsTr" / "c0.nii.gz") in str(e.value)


def test_empty_dataset(tmp_path):
  root = _dataset(tmp_path / "d", n=0)
  (root / "imagesTr").mkdir()
  (root / "labelsTr").mkdir()
  with pytest.raises(DataError, match="empty dataset") as e:
    discover_dataset(root)
  assert str(root / "imagesTr") in str(e.value)


def test_fewer_cases_than_folds(tmp_path):
  root = _dataset(tmp_path / "d", n=3)
  _fails(root, root, "3 case.*5 folds", num_folds=5)


@pytest.mark.parametrize("fold", [3, -1, "best"])
def test_fold_out_of_range(tmp_path, fold):
  root = _dataset(tmp_path / "d", n=3)
  _fails(root, root, "fold", num_folds=3, fold=fold)
  validation.validate_dataset(discover_dataset(root), num_folds=3, fold="all")
