"""The synthetic dataset on disk: layouts, headers, storage orientations, determinism, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from absl import flags

from vnet_jax.data import phantom, synthetic
from vnet_jax.data.layouts import FLARE22_CLASSES
from vnet_jax.errors import DataError

REPO = Path(__file__).resolve().parent.parent
NUM_CASES = len(synthetic.ORIENTATIONS)  # one case per storage orientation
SHAPE = (64, 56, 20)  # x != y, so an in-plane axis swap shows in the stored shape


def _load(path):
  img = nib.load(str(path))
  return img, np.asanyarray(img.dataobj)


def _flare_paths(root, case):
  return root / "images" / f"{case}_0000.nii.gz", root / "labels" / f"{case}.nii.gz"


@pytest.fixture(scope="module")
def flare_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("flare22")
  ids = synthetic.write_dataset(str(root), NUM_CASES, layout="flare22", seed=0, shape=SHAPE)
  return root, ids


@pytest.fixture(scope="module")
def flare_cases(flare_dir):
  root, ids = flare_dir
  cases = []
  for case in ids:
    (img, image), (lab, label) = (_load(p) for p in _flare_paths(root, case))
    cases.append((case, img, image, lab, label))
  return cases


def _world_centroid(label, affine, organ):
  idx = np.argwhere(label == organ).mean(0)
  return nib.affines.apply_affine(affine, idx)


def test_flare22_layout_files(flare_dir):
  root, ids = flare_dir
  assert ids == [f"FLARE22_Tr_{i:04d}" for i in range(1, NUM_CASES + 1)]
  assert sorted(os.listdir(root)) == ["images", "labels"]  # no temporary files left behind
  assert sorted(os.listdir(root / "images")) == [f"{c}_0000.nii.gz" for c in ids]
  assert sorted(os.listdir(root / "labels")) == [f"{c}.nii.gz" for c in ids]


def test_nnunet_layout_and_dataset_json(tmp_path):
  ids = synthetic.write_dataset(str(tmp_path), 2, layout="nnunet", seed=5, shape=(48, 48, 12))
  assert ids == ["FLARE22_Tr_0001", "FLARE22_Tr_0002"]
  assert sorted(os.listdir(tmp_path)) == ["dataset.json", "imagesTr", "labelsTr"]
  assert sorted(os.listdir(tmp_path / "imagesTr")) == [f"{c}_0000.nii.gz" for c in ids]
  assert sorted(os.listdir(tmp_path / "labelsTr")) == [f"{c}.nii.gz" for c in ids]
  spec = json.loads((tmp_path / "dataset.json").read_text())
  assert spec["channel_names"] == {"0": "CT"}
  assert spec["numTraining"] == 2
  assert spec["file_ending"] == ".nii.gz"
  assert spec["labels"] == {name: k for k, name in FLARE22_CLASSES.items()}
  assert list(spec["labels"].values()) == list(range(14))  # background first
  assert spec["labels"]["liver"] == 1 and spec["labels"]["left kidney"] == 13
  img = nib.load(str(tmp_path / "imagesTr" / f"{ids[0]}_0000.nii.gz"))
  assert sorted(img.shape) == [12, 48, 48]


def test_dtypes_and_headers(flare_cases):
  for case, img, image, lab, label in flare_cases:
    assert image.dtype == np.int16 and img.get_data_dtype() == np.int16, case
    assert label.dtype == np.uint8 and lab.get_data_dtype() == np.uint8, case
    assert image.shape == label.shape, case
    np.testing.assert_allclose(img.affine, lab.affine, atol=1e-5, err_msg=case)
    for im in (img, lab):
      assert int(im.header["sform_code"]) == 1 and int(im.header["qform_code"]) == 1, case
      np.testing.assert_allclose(im.get_qform(), im.get_sform(), atol=1e-4, err_msg=case)
      assert im.header.get_xyzt_units() == ("mm", "unknown"), case


def test_orientations_vary_and_include_a_permutation(flare_cases):
  codes = [nib.aff2axcodes(img.affine) for _, img, *_ in flare_cases]
  assert len(set(codes)) == NUM_CASES, codes
  assert ("R", "A", "S") in codes and ("L", "P", "S") in codes
  # At least one case stores the slice axis somewhere other than last.
  assert any(c[2] not in ("S", "I") for c in codes), codes


def test_closest_canonical_recovers_the_phantom_exactly(flare_cases):
  # Case i is make_case(seed, i) in the canonical grid, whatever orientation stores it.
  for i, (case, img, _, lab, _) in enumerate(flare_cases):
    image, label, affine = phantom.make_case(np.random.default_rng([0, i]), SHAPE)
    for stored, expected in ((img, image), (lab, label)):
      canon = nib.as_closest_canonical(stored)
      assert nib.aff2axcodes(canon.affine) == ("R", "A", "S"), case
      np.testing.assert_array_equal(np.asanyarray(canon.dataobj), expected, err_msg=case)
      np.testing.assert_allclose(canon.affine, affine, atol=1e-5, err_msg=case)


def test_anatomy_sides_in_world_coordinates(flare_cases):
  """Whatever the storage orientation, the organs sit on the right side of the patient.

  RAS+ world coordinates: x grows towards the patient's right, y anterior, z superior.
  """
  for case, img, _, _, label in flare_cases:
    c = {k: _world_centroid(label, img.affine, k) for k in range(1, 14)}
    assert c[phantom.LIVER][0] > c[phantom.SPLEEN][0] + 5, case  # mm
    assert c[phantom.RIGHT_KIDNEY][0] > c[phantom.LEFT_KIDNEY][0] + 5, case
    assert c[phantom.GALLBLADDER][1] > c[phantom.AORTA][1], case
    assert c[phantom.ESOPHAGUS][2] > c[phantom.LIVER][2] > c[phantom.RIGHT_KIDNEY][2], case


@pytest.mark.parametrize("axcodes", synthetic.ORIENTATIONS)
def test_reorient_round_trip_is_exact(axcodes):
  image, label, affine = phantom.make_case(np.random.default_rng(3), shape=(40, 36, 10))
  s_image, s_label, s_affine = synthetic.reorient(image, label, affine, axcodes)
  assert nib.aff2axcodes(s_affine) == tuple(axcodes)
  canon = nib.as_closest_canonical(nib.Nifti1Image(s_label, s_affine))
  np.testing.assert_array_equal(np.asanyarray(canon.dataobj), label)
  np.testing.assert_allclose(canon.affine, affine, atol=1e-6)
  canon = nib.as_closest_canonical(nib.Nifti1Image(s_image, s_affine))
  np.testing.assert_array_equal(np.asanyarray(canon.dataobj), image)


def test_determinism(flare_dir, tmp_path):
  # Case i depends only on (seed, i): a one-case dataset equals the first case of a larger one.
  root, ids = flare_dir
  synthetic.write_dataset(str(tmp_path), 1, seed=0, shape=SHAPE)
  for new, old in zip(_flare_paths(tmp_path, ids[0]), _flare_paths(root, ids[0])):
    (img_n, arr_n), (img_o, arr_o) = _load(new), _load(old)
    np.testing.assert_array_equal(arr_n, arr_o)
    np.testing.assert_allclose(img_n.affine, img_o.affine)
  # Cases differ from each other, and another seed gives other cases.
  first = _load(_flare_paths(root, ids[0])[1])[1]
  second = _load(_flare_paths(root, ids[1])[1])[1]
  assert first.shape != second.shape or not np.array_equal(first, second)
  other = tmp_path / "seed1"
  synthetic.write_dataset(str(other), 1, seed=1, shape=SHAPE)
  assert not np.array_equal(_load(_flare_paths(other, ids[0])[1])[1], first)


def test_refuses_a_directory_holding_other_cases(tmp_path):
  synthetic.write_dataset(str(tmp_path), 2, shape=(40, 40, 10))
  with pytest.raises(DataError, match="FLARE22_Tr_0002"):
    synthetic.write_dataset(str(tmp_path), 1, shape=(40, 40, 10))
  synthetic.write_dataset(str(tmp_path), 2, seed=4, shape=(40, 40, 10))  # same files: overwritten


def test_bad_arguments_are_data_errors(tmp_path):
  with pytest.raises(DataError, match="layout 'nnU-Net'"):
    synthetic.write_dataset(str(tmp_path), 1, layout="nnU-Net")
  with pytest.raises(DataError, match="num_cases=0"):
    synthetic.write_dataset(str(tmp_path), 0)
  with pytest.raises(DataError, match="synthetic size"):
    synthetic.write_dataset(str(tmp_path), 1, shape=(16, 16, 4))


def test_importing_defines_no_flags():
  # Flags are defined only when run as a program (the training process defines its own).
  assert not {"out", "cases", "layout", "size"} & set(flags.FLAGS)


def _cli(*args):
  env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  cmd = [sys.executable, "-m", "vnet_jax.data.synthetic", *args]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
  out = tmp_path / "ds"
  args = [f"--out={out}", "--cases=2", "--layout=nnunet", "--seed=3", "--spacing=0.8,0.8,3"]
  proc = _cli(*args, "--size=48,40,12")
  assert proc.returncode == 0, proc.stderr
  assert "wrote 2 synthetic cases" in proc.stdout
  assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
  img = nib.load(str(out / "imagesTr" / "FLARE22_Tr_0001_0000.nii.gz"))
  canon = nib.as_closest_canonical(img)
  assert canon.shape == (48, 40, 12)
  np.testing.assert_allclose(canon.header.get_zooms(), (0.8, 0.8, 3.0), rtol=1e-5)


@pytest.mark.parametrize(
  "size, message",
  [
    ("48,40", "--size=48,40: expected three comma-separated numbers X,Y,Z"),
    ("16,16,4", "synthetic size (16, 16, 4): need (x, y, z) with x, y >= 32 and z >= 8"),
  ],
)
def test_cli_errors_are_one_line(tmp_path, size, message):
  proc = _cli(f"--out={tmp_path / 'ds'}", f"--size={size}")
  assert proc.returncode == 1
  assert proc.stderr.strip() == f"error: {message}"
