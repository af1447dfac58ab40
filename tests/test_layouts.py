"""Dataset discovery: FLARE22 and nnU-Net v2 layouts, prediction inputs, and their errors."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vnet_jax.data import layouts
from vnet_jax.data.layouts import FLARE22_CLASSES, FLARE22_TOLERANCES_MM, discover_dataset
from vnet_jax.errors import DataError


def _nifti(path: Path, shape=(4, 5, 6), value=0, dtype=np.int16):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(np.full(shape, value, dtype), np.eye(4)), str(path))
  return path


def _flare(root: Path, cases=("FLARE22_Tr_0001", "FLARE22_Tr_0002"), ending=".nii.gz"):
  for c in cases:
    _nifti(root / "images" / f"{c}_0000{ending}")
    _nifti(root / "labels" / f"{c}{ending}", dtype=np.uint8)
  return root


def _nnunet(
  root: Path, cases=("case_a", "case_b"), channels=("CT",), ending=".nii.gz", labels=None
):
  root.mkdir(parents=True, exist_ok=True)
  spec = {
    "channel_names": {str(i): n for i, n in enumerate(channels)},
    "labels": labels or {"background": 0, "liver": 1, "spleen": 2},
    "numTraining": len(cases),
    "file_ending": ending,
  }
  (root / "dataset.json").write_text(json.dumps(spec))
  for c in cases:
    for i in range(len(channels)):
      _nifti(root / "imagesTr" / f"{c}_{i:04d}{ending}")
    _nifti(root / "labelsTr" / f"{c}{ending}", dtype=np.uint8)
  return root


def test_flare22_tables():
  assert len(FLARE22_CLASSES) == 14 and FLARE22_CLASSES[0] == "background"
  assert set(FLARE22_TOLERANCES_MM) == set(FLARE22_CLASSES) - {0}
  assert FLARE22_CLASSES[13] == "left kidney" and FLARE22_TOLERANCES_MM[12] == 7.0


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_flare22_layout(tmp_path, ending):
  root = _flare(tmp_path / "FLARE22Train", ending=ending)
  (root / "images" / "notes.txt").write_text("ignored")
  (root / "images" / "._FLARE22_Tr_0001_0000.nii.gz").write_text("macOS junk, ignored")
  ds = discover_dataset(root)
  assert ds.layout == layouts.FLARE22
  assert ds.case_ids == ("FLARE22_Tr_0001", "FLARE22_Tr_0002")
  assert ds.channel_names == ("CT",)
  assert ds.class_names == FLARE22_CLASSES and ds.num_classes == 14
  c = ds.cases[0]
  assert c.image_files == (root / "images" / f"FLARE22_Tr_0001_0000{ending}",)
  assert c.label_file == root / "labels" / f"FLARE22_Tr_0001{ending}"


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_nnunet_layout_multichannel(tmp_path, ending):
  root = _nnunet(
    tmp_path / "Dataset001",
    cases=("b", "a", "c"),
    channels=("T2", "ADC"),
    ending=ending,
    labels={"background": 0, "prostate": 1, "zone": 3},
  )
  ds = discover_dataset(root)
  assert ds.layout == layouts.NNUNET_V2
  assert ds.case_ids == ("a", "b", "c")
  assert ds.channel_names == ("T2", "ADC")
  assert ds.class_names == {0: "background", 1: "prostate", 3: "zone"}
  assert ds.num_classes == 4
  assert [f.name for f in ds.case("b").image_files] == [f"b_0000{ending}", f"b_0001{ending}"]
  assert ds.case("b").label_file.name == f"b{ending}"


def test_missing_directory(tmp_path):
  with pytest.raises(DataError, match="does not exist") as e:
    discover_dataset(tmp_path / "nope")
  assert str(tmp_path / "nope") in str(e.value)


def test_unknown_layout_names_expected_layouts(tmp_path):
  _nifti(tmp_path / "x" / "scan.nii.gz")
  with pytest.raises(DataError) as e:
    discover_dataset(tmp_path / "x")
  msg = str(e.value)
  assert str(tmp_path / "x") in msg and "FLARE22" in msg and "nnU-Net" in msg
  assert "\n" not in msg


def test_empty_dataset(tmp_path):
  (tmp_path / "d" / "images").mkdir(parents=True)
  (tmp_path / "d" / "labels").mkdir()
  with pytest.raises(DataError, match="empty dataset") as e:
    discover_dataset(tmp_path / "d")
  assert str(tmp_path / "d" / "images") in str(e.value)


def test_image_without_label(tmp_path):
  root = _flare(tmp_path / "d")
  _nifti(root / "images" / "extra_0000.nii.gz")
  with pytest.raises(DataError, match="image without label") as e:
    discover_dataset(root)
  assert str(root / "images" / "extra_0000.nii.gz") in str(e.value)


def test_label_without_image(tmp_path):
  root = _nnunet(tmp_path / "d")
  _nifti(root / "labelsTr" / "orphan.nii.gz")
  with pytest.raises(DataError, match="label without image") as e:
    discover_dataset(root)
  assert str(root / "labelsTr" / "orphan.nii.gz") in str(e.value)


def test_missing_channel_file(tmp_path):
  root = _nnunet(tmp_path / "d", channels=("T2", "ADC"))
  (root / "imagesTr" / "case_b_0001.nii.gz").unlink()
  with pytest.raises(DataError, match="missing channel") as e:
    discover_dataset(root)
  assert str(root / "imagesTr" / "case_b_0001.nii.gz") in str(e.value)


def test_channel_beyond_dataset_json(tmp_path):
  root = _nnunet(tmp_path / "d")
  _nifti(root / "imagesTr" / "case_a_0001.nii.gz")
  with pytest.raises(DataError, match="channel 1") as e:
    discover_dataset(root)
  assert "case_a_0001.nii.gz" in str(e.value)


@pytest.mark.parametrize(
  "text, reason",
  [
    ("{not json", "invalid JSON"),
    (json.dumps({"labels": {"background": 0}}), "channel_names"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"liver": 1}}), "background"),
    (
      json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "r": [1, 2]}}),
      "integer labels",
    ),
    (json.dumps({"channel_names": {"1": "CT"}, "labels": {"background": 0}}), "0..0"),
    (
      json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0}, "file_ending": ".mha"}
      ),
      "file_ending",
    ),
  ],
)
def test_bad_dataset_json(tmp_path, text, reason):
  root = _nnunet(tmp_path / "d")
  (root / "dataset.json").write_text(text)
  with pytest.raises(DataError, match=reason) as e:
    discover_dataset(root)
  assert str(root / "dataset.json") in str(e.value) and "\n" not in str(e.value)


def test_discover_images_groups_channels(tmp_path):
  d = tmp_path / "in"
  for f in ("p1_0000.nii.gz", "p1_0001.nii.gz", "p2_0000.nii", "p2_0001.nii", "plain.nii.gz"):
    _nifti(d / f)
  (d / "readme.md").write_text("ignored")
  cases = layouts.discover_images(d)
  assert [c.case_id for c in cases] == ["p1", "p2", "plain"]
  assert [f.name for f in cases[0].image_files] == ["p1_0000.nii.gz", "p1_0001.nii.gz"]
  assert [f.name for f in cases[1].image_files] == ["p2_0000.nii", "p2_0001.nii"]
  assert cases[2].image_files == (d / "plain.nii.gz",)
  assert all(c.label_file is None for c in cases)


def test_discover_images_single_file_and_errors(tmp_path):
  f = _nifti(tmp_path / "scan_0000.nii.gz")
  (c,) = layouts.discover_images(f)
  assert c.case_id == "scan" and c.image_files == (f,)
  with pytest.raises(DataError, match="missing channel") as e:
    _nifti(tmp_path / "multi" / "m_0001.nii.gz")
    layouts.discover_images(tmp_path / "multi")
  assert "m_0000" in str(e.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="no .nii"):
    layouts.discover_images(tmp_path / "empty")
  with pytest.raises(DataError, match="does not exist"):
    layouts.discover_images(tmp_path / "missing.nii.gz")


def test_flare22_image_without_channel_suffix(tmp_path):
  root = _flare(tmp_path / "d")
  _nifti(root / "images" / "scan.nii.gz")
  with pytest.raises(DataError, match="_XXXX") as e:
    discover_dataset(root)
  assert str(root / "images" / "scan.nii.gz") in str(e.value)
