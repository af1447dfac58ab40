"""Synthetic FLARE22-like data: layouts, headers, anatomy in world space, determinism, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vnet_jax.data import synthetic
from vnet_jax.data.layouts import FLARE22_CLASSES
from vnet_jax.errors import DataError

REPO = Path(__file__).resolve().parent.parent
NUM_CASES = len(synthetic.ORIENTATIONS)  # one case per storage orientation


def _load(path):
  img = nib.load(str(path))
  return img, np.asanyarray(img.dataobj)


def _flare_paths(root, case):
  return root / "images" / f"{case}_0000.nii.gz", root / "labels" / f"{case}.nii.gz"


@pytest.fixture(scope="module")
def flare_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("flare22")
  ids = synthetic.write_dataset(str(root), NUM_CASES, layout="flare22", seed=0)
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


def test_dtypes_shapes_and_headers(flare_cases):
  for case, img, image, lab, label in flare_cases:
    assert image.dtype == np.int16 and img.get_data_dtype() == np.int16, case
    assert label.dtype == np.uint8 and lab.get_data_dtype() == np.uint8, case
    assert image.shape == label.shape, case
    np.testing.assert_allclose(img.affine, lab.affine, atol=1e-5, err_msg=case)
    for im in (img, lab):
      assert int(im.header["sform_code"]) == 1 and int(im.header["qform_code"]) == 1, case
      np.testing.assert_allclose(im.get_qform(), im.get_sform(), atol=1e-4, err_msg=case)
    assert set(np.unique(label)) <= set(range(14)), case
    # Default geometry: 96-128 voxels of 0.7-0.9 mm in-plane, 24-48 slices of 2.5-5 mm.
    canon = nib.as_closest_canonical(img)
    x, y, z = canon.shape
    sx, sy, sz = canon.header.get_zooms()
    assert 96 <= x <= 128 and 96 <= y <= 128 and 24 <= z <= 48, (case, canon.shape)
    assert 0.7 <= sx <= 0.9 and 0.7 <= sy <= 0.9 and 2.5 <= sz <= 5.0, (case, (sx, sy, sz))


def test_orientations_vary_and_include_a_permutation(flare_cases):
  codes = [nib.aff2axcodes(img.affine) for _, img, *_ in flare_cases]
  assert len(set(codes)) == NUM_CASES, codes
  assert ("R", "A", "S") in codes and ("L", "P", "S") in codes
  # At least one case stores the slice axis somewhere other than last.
  assert any(c[2] not in ("S", "I") for c in codes), codes


def test_anatomy_sides_in_world_coordinates(flare_cases):
  """Whatever the storage orientation, the organs sit on the right side of the patient.

  RAS+ world coordinates: x grows towards the patient's right, y anterior, z superior.
  """
  for case, img, _, _, label in flare_cases:
    c = {k: _world_centroid(label, img.affine, k) for k in range(1, 14)}
    right_of = lambda a, b, c=c: c[a][0] > c[b][0] + 5  # mm
    assert right_of(synthetic.LIVER, synthetic.SPLEEN), case
    assert right_of(synthetic.RIGHT_KIDNEY, synthetic.LEFT_KIDNEY), case
    assert right_of(synthetic.RIGHT_ADRENAL, synthetic.LEFT_ADRENAL), case
    assert right_of(synthetic.IVC, synthetic.AORTA), case
    assert right_of(synthetic.GALLBLADDER, synthetic.STOMACH), case
    # Kidneys lie behind the pancreas; the gallbladder is in front of the aorta.
    assert c[synthetic.RIGHT_KIDNEY][1] < c[synthetic.PANCREAS][1], case
    assert c[synthetic.LEFT_KIDNEY][1] < c[synthetic.PANCREAS][1], case
    assert c[synthetic.GALLBLADDER][1] > c[synthetic.AORTA][1], case
    # Esophagus and liver above the kidneys; adrenals above the kidneys.
    assert c[synthetic.ESOPHAGUS][2] > c[synthetic.LIVER][2] > c[synthetic.RIGHT_KIDNEY][2], case
    assert c[synthetic.RIGHT_ADRENAL][2] > c[synthetic.RIGHT_KIDNEY][2], case
    assert c[synthetic.LEFT_ADRENAL][2] > c[synthetic.LEFT_KIDNEY][2], case


def test_closest_canonical_recovers_the_same_layout(flare_cases):
  for case, _, _, lab, _ in flare_cases:
    canon = nib.as_closest_canonical(lab)
    assert nib.aff2axcodes(canon.affine) == ("R", "A", "S"), case
    label = np.asanyarray(canon.dataobj)
    x, y, z = label.shape
    idx = {k: np.argwhere(label == k).mean(0) for k in (1, 3, 5, 10, 13)}
    assert idx[synthetic.LIVER][0] > x / 2 > idx[synthetic.SPLEEN][0], case  # right / left
    assert idx[synthetic.AORTA][1] < y / 2, case  # posterior half
    assert idx[synthetic.ESOPHAGUS][2] > z / 2, case  # upper half
    assert idx[synthetic.LEFT_KIDNEY][2] < z / 2, case  # lower half


@pytest.mark.parametrize("axcodes", synthetic.ORIENTATIONS)
def test_reorient_round_trip_is_exact(axcodes):
  image, label, affine = synthetic.make_case(np.random.default_rng(3), shape=(40, 36, 10))
  s_image, s_label, s_affine = synthetic.reorient(image, label, affine, axcodes)
  assert nib.aff2axcodes(s_affine) == tuple(axcodes)
  canon = nib.as_closest_canonical(nib.Nifti1Image(s_label, s_affine))
  np.testing.assert_array_equal(np.asanyarray(canon.dataobj), label)
  np.testing.assert_allclose(canon.affine, affine, atol=1e-6)
  canon = nib.as_closest_canonical(nib.Nifti1Image(s_image, s_affine))
  np.testing.assert_array_equal(np.asanyarray(canon.dataobj), image)


def test_every_organ_present_with_enough_voxels(flare_cases):
  small = {
    synthetic.RIGHT_ADRENAL: 30,
    synthetic.LEFT_ADRENAL: 30,
    synthetic.GALLBLADDER: 80,
    synthetic.ESOPHAGUS: 120,
  }
  for case, *_, label in flare_cases:
    counts = np.bincount(label.ravel(), minlength=14)
    for organ in range(1, 14):
      assert counts[organ] >= small.get(organ, 250), (case, organ, counts[organ])
    assert counts[synthetic.LIVER] == counts[1:].max(), case
    assert counts[0] > 0.8 * label.size, case


def test_intensities(flare_cases):
  for case, img, _, lab, _ in flare_cases:
    image = np.asanyarray(nib.as_closest_canonical(img).dataobj)
    label = np.asanyarray(nib.as_closest_canonical(lab).dataobj)  # slices on the last axis
    # Air outside the body, bone in the spine.
    assert image.min() >= -1024 and np.median(image[label == 0]) < -500, case
    assert (image > 400).sum() > 100, case
    means = {}
    for organ in range(1, 14):
      # Interior voxels only: the partial-volume blur mixes the boundary with its neighbours.
      inner = ndimage.binary_erosion(label == organ, structure=np.ones((3, 3, 1), bool))
      assert inner.sum() >= 10, (case, organ)
      tol = 30 if organ in (synthetic.AORTA, synthetic.IVC) else 20
      means[organ] = float(image[inner].mean())
      assert abs(means[organ] - synthetic.ORGAN_HU[organ]) < tol, (case, organ, means[organ])
    # Contrast-filled aorta brightest; fluid-filled gallbladder darker than solid organs.
    assert max(means, key=means.get) == synthetic.AORTA, (case, means)
    solid = (synthetic.LIVER, synthetic.SPLEEN, synthetic.PANCREAS, synthetic.RIGHT_KIDNEY)
    assert means[synthetic.GALLBLADDER] < min(means[k] for k in solid) - 15, (case, means)


def test_determinism(flare_dir, tmp_path):
  a = synthetic.make_case(np.random.default_rng(7), shape=(40, 40, 10))
  b = synthetic.make_case(np.random.default_rng(7), shape=(40, 40, 10))
  c = synthetic.make_case(np.random.default_rng(8), shape=(40, 40, 10))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
  # Case i depends only on (seed, i): a one-case dataset equals the first case of a larger one.
  root, ids = flare_dir
  synthetic.write_dataset(str(tmp_path), 1, seed=0)
  for new, old in zip(_flare_paths(tmp_path, ids[0]), _flare_paths(root, ids[0])):
    (img_n, arr_n), (img_o, arr_o) = _load(new), _load(old)
    np.testing.assert_array_equal(arr_n, arr_o)
    np.testing.assert_allclose(img_n.affine, img_o.affine)
  # Cases differ from each other, and another seed gives other cases.
  first = _load(_flare_paths(root, ids[0])[1])[1]
  second = _load(_flare_paths(root, ids[1])[1])[1]
  assert first.shape != second.shape or not np.array_equal(first, second)
  other = tmp_path / "seed1"
  synthetic.write_dataset(str(other), 1, seed=1)
  assert not np.array_equal(_load(_flare_paths(other, ids[0])[1])[1], first)


def test_refuses_a_directory_holding_other_cases(tmp_path):
  synthetic.write_dataset(str(tmp_path), 2, shape=(40, 40, 10))
  with pytest.raises(DataError, match="FLARE22_Tr_0002"):
    synthetic.write_dataset(str(tmp_path), 1, shape=(40, 40, 10))
  synthetic.write_dataset(str(tmp_path), 2, seed=4, shape=(40, 40, 10))  # same files: overwritten


def test_cli(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  cmd = [
    sys.executable,
    "-m",
    "vnet_jax.data.synthetic",
    f"--out={tmp_path / 'ds'}",
    "--cases=2",
    "--layout=nnunet",
    "--seed=3",
    "--size=48,40,12",
    "--spacing=0.8,0.8,3",
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "wrote 2 synthetic cases" in proc.stdout
  assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["numTraining"] == 2
  img = nib.load(str(tmp_path / "ds" / "imagesTr" / "FLARE22_Tr_0001_0000.nii.gz"))
  canon = nib.as_closest_canonical(img)
  assert canon.shape == (48, 40, 12)
  np.testing.assert_allclose(canon.header.get_zooms(), (0.8, 0.8, 3.0), rtol=1e-5)
  bad = subprocess.run(
    cmd[:-2] + ["--size=48,40"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert bad.returncode != 0
  assert "--size=48,40" in bad.stderr and "Traceback" not in bad.stderr
