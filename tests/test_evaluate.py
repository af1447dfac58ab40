"""Folder evaluation (NIfTI files paired by case id) and the scoring command line."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from absl import flags

from tests.conftest import run_module
from tests.label_volumes import cube, tube
from vnet_jax import evaluate as ev
from vnet_jax import scoring
from vnet_jax.data.layouts import FLARE22_CLASSES
from vnet_jax.errors import DataError


def save(path, arr, affine=None, spacing=(1.0, 1.0, 1.0)):
  if affine is None:
    affine = np.diag([*spacing, 1.0])
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(arr, np.uint8), affine), str(path))
  return path


# ---------------------------------------------------------------------------- evaluate_folder


def make_folder(tmp_path, cases, ref_name="ref", spacing=(1.0, 1.0, 1.0), affine=None):
  """cases: {case_id: (pred, ref)}; returns (pred_dir, ref_dir)."""
  pred_dir, ref_dir = tmp_path / "pred", tmp_path / ref_name
  for cid, (pred, ref) in cases.items():
    save(ref_dir / f"{cid}.nii.gz", ref, affine, spacing)
    save(pred_dir / f"{cid}.nii.gz", pred, affine, spacing)
  return pred_dir, ref_dir


def test_evaluate_folder_structure_and_means(tmp_path):
  ref_a = cube(label=1) + tube(0, 10, 2, shape=(10, 10, 10)) * (cube(label=1) == 0)
  pred_a = np.roll(ref_a, 1, axis=0)
  ref_b = cube(label=1)
  pred_b = cube(label=1) + (tube(0, 2, 2, shape=(10, 10, 10)))  # class 2 predicted only
  pred_dir, ref_dir = make_folder(tmp_path, {"case_b": (pred_b, ref_b), "case_a": (pred_a, ref_a)})
  names = {0: "background", 1: "liver", 2: "aorta"}
  summary = ev.evaluate_folder(pred_dir, ref_dir, names, tolerances=1.5)
  assert set(summary) == {"mean_dice", "mean_nsd", "per_class", "per_case"}
  assert list(summary["per_class"]) == ["liver", "aorta"]
  assert [c["case"] for c in summary["per_case"]] == ["case_a", "case_b"]
  for case in summary["per_case"]:
    assert set(case) == {"case", "per_class"}
    assert list(case["per_class"]) == ["liver", "aorta"]
    assert all(set(s) == {"dice", "nsd", "hd95"} for s in case["per_class"].values())
  # Per-case values are evaluate_case's, with the 1.5 mm tolerance for every class.
  exp_a = scoring.evaluate_case(pred_a, ref_a, (1, 1, 1), [1, 2], {1: 1.5, 2: 1.5})
  exp_b = scoring.evaluate_case(pred_b, ref_b, (1, 1, 1), [1, 2], {1: 1.5, 2: 1.5})
  assert summary["per_case"][0]["per_class"]["aorta"] == exp_a[2]
  assert summary["per_case"][1]["per_class"]["aorta"]["dice"] == 0.0
  for cid, name in ((1, "liver"), (2, "aorta")):
    for m in ("dice", "nsd"):
      expected = np.mean([exp_a[cid][m], exp_b[cid][m]], dtype=np.float64)
      assert summary["per_class"][name][m] == pytest.approx(expected, abs=1e-12)
  # hd95 of a prediction-only class is NaN and skipped by the mean.
  assert summary["per_class"]["aorta"]["hd95"] == pytest.approx(exp_a[2]["hd95"], abs=1e-12)
  assert math.isnan(summary["per_case"][1]["per_class"]["aorta"]["hd95"])
  for key, m in (("mean_dice", "dice"), ("mean_nsd", "nsd")):
    expected = np.mean([summary["per_class"][n][m] for n in ("liver", "aorta")], dtype=np.float64)
    assert summary[key] == pytest.approx(expected, abs=1e-12)


def test_hidden_and_other_files_are_not_cases(tmp_path):
  ref = cube(label=1)
  pred_dir, ref_dir = make_folder(tmp_path, {"a": (ref, ref)})
  (pred_dir / "._a.nii.gz").write_bytes(b"macOS resource fork")  # would be case '._a'
  (pred_dir / "summary.json").write_text("{}")
  (pred_dir / "b.nii.gz").mkdir()
  s = ev.evaluate_folder(pred_dir, ref_dir, {1: "liver"})
  assert [c["case"] for c in s["per_case"]] == ["a"]


def test_reference_spacing_and_orientation_come_from_header(tmp_path):
  ref = tube(4, 8, 5, axis=0, shape=(12, 8, 8)) + cube((12, 8, 8), (1, 1, 1), 2, 1)
  pred = tube(0, 12, 5, axis=0, shape=(12, 8, 8)) + cube((12, 8, 8), (1, 1, 2), 2, 1)
  # Stored with voxel axis 0 along S: the aorta's extra slices along axis 0 are not scored.
  s_first = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
  p1, r1 = make_folder(tmp_path / "a", {"c": (pred, ref)}, affine=s_first)
  got = ev.evaluate_folder(p1, r1, {1: "liver", 5: "aorta"})["per_case"][0]["per_class"]
  assert got["aorta"]["dice"] == 1.0
  # The same arrays with axis 2 along S: now they are.
  s_last = np.diag([3.0, 1.0, 1.0, 1.0])
  p2, r2 = make_folder(tmp_path / "b", {"c": (pred, ref)}, affine=s_last)
  got2 = ev.evaluate_folder(p2, r2, {1: "liver", 5: "aorta"})["per_case"][0]["per_class"]
  assert got2["aorta"]["dice"] == pytest.approx(np.float64(2 * 16) / (16 + 48), abs=1e-12)
  # Liver is shifted by one voxel along axis 2, 1 mm in both headers (FLARE22 liver tolerance
  # 5 mm); compare with a header whose axis-2 spacing is 6 mm: the shift then exceeds 5 mm.
  assert got["liver"]["nsd"] == pytest.approx(1.0)
  wide = np.diag([1.0, 1.0, 6.0, 1.0])
  p3, r3 = make_folder(tmp_path / "c", {"c": (pred, ref)}, affine=wide)
  got3 = ev.evaluate_folder(p3, r3, {1: "liver"})["per_case"][0]["per_class"]
  assert got3["liver"]["nsd"] < 1.0
  assert got3["liver"]["hd95"] == pytest.approx(6.0, abs=1e-9)
  assert got3["liver"]["dice"] == got["liver"]["dice"]


def test_class_names_dataset_json_flare22_and_ids(tmp_path):
  ref = cube(label=3)
  pred = cube(label=3)
  # nnU-Net v2 layout: dataset.json beside labelsTr is read automatically.
  root = tmp_path / "Dataset001"
  pred_dir, ref_dir = make_folder(root, {"x_001": (pred, ref)}, ref_name="labelsTr")
  spec = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
  labels = {"background": 0, "liver": 1, "spleen": 3}
  (root / "dataset.json").write_text(json.dumps({**spec, "labels": labels}))
  s = ev.evaluate_folder(pred_dir, ref_dir)
  assert list(s["per_class"]) == ["liver", "spleen"]
  assert s["per_class"]["liver"]["dice"] == 1.0  # absent from both
  # Explicit names (--dataset_json); nnU-Net's "ignore" label is not a class.
  other = tmp_path / "other.json"
  other.write_text(json.dumps({**spec, "labels": {"background": 0, "milz": 3, "ignore": 4}}))
  assert ev.class_names_from_dataset_json(other) == {3: "milz"}
  assert list(
    ev.evaluate_folder(pred_dir, ref_dir, ev.class_names_from_dataset_json(other))["per_class"]
  ) == ["milz"]
  # The one dataset.json reader (layouts') takes nnU-Net v2 files only.
  other.write_text(json.dumps({**spec, "labels": {"0": "background", "3": "milz"}}))
  with pytest.raises(DataError, match=r"other\.json: label '0'"):
    ev.class_names_from_dataset_json(other)
  # FLARE22Train layout (labels/ beside images/): the FLARE22 table, all 13 organs.
  flare = tmp_path / "FLARE22Train"
  (flare / "images").mkdir(parents=True)
  pred_dir, ref_dir = make_folder(flare, {"case1": (pred, ref)}, ref_name="labels")
  s = ev.evaluate_folder(pred_dir, ref_dir)
  assert list(s["per_class"]) == [FLARE22_CLASSES[c] for c in range(1, 14)]
  assert s["per_class"]["spleen"]["dice"] == 1.0
  assert s["mean_dice"] == 1.0
  # Anything else: labels found in any reference, named by id.
  ref2 = cube(label=2)
  pred_dir, ref_dir = make_folder(tmp_path / "plain", {"a": (pred, ref), "b": (ref2, ref2)})
  s = ev.evaluate_folder(pred_dir, ref_dir)
  assert list(s["per_class"]) == ["2", "3"]
  assert s["per_case"][0]["per_class"]["2"] == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}


def test_folder_errors_name_the_file(tmp_path):
  ref = cube(label=1)
  pred_dir, ref_dir = make_folder(tmp_path, {"a": (ref, ref), "b": (ref, ref)})
  (pred_dir / "b.nii.gz").unlink()
  with pytest.raises(DataError, match=r"b\.nii\.gz: missing prediction") as e:
    ev.evaluate_folder(pred_dir, ref_dir, {1: "liver"})
  assert "\n" not in str(e.value)
  assert len(ev.evaluate_folder(pred_dir, ref_dir, {1: "liver"}, chill=True)["per_case"]) == 1
  save(pred_dir / "b.nii.gz", cube((10, 10, 9), label=1))
  with pytest.raises(DataError, match=r"pred/b\.nii\.gz: shape"):
    ev.evaluate_folder(pred_dir, ref_dir, {1: "liver"})
  save(pred_dir / "b.nii.gz", ref, spacing=(1.0, 1.0, 1.2))
  with pytest.raises(DataError, match=r"pred/b\.nii\.gz: affine"):
    ev.evaluate_folder(pred_dir, ref_dir, {1: "liver"})
  save(pred_dir / "c.nii.gz", ref)
  with pytest.raises(DataError, match=r"c\.nii\.gz: no reference"):
    ev.evaluate_folder(pred_dir, ref_dir, {1: "liver"})
  (pred_dir / "c.nii.gz").unlink()
  (pred_dir / "b.nii.gz").write_bytes(b"not a nifti")
  with pytest.raises(DataError, match=r"b\.nii\.gz: cannot read"):
    ev.evaluate_folder(pred_dir, ref_dir, {1: "liver"})


# ---------------------------------------------------------------------------- command line


def _cli(*args):
  return run_module("vnet_jax.evaluate", *args)


@pytest.mark.slow
def test_cli_success_and_bad_input(tmp_path):
  ref = cube(label=1)
  pred_dir, ref_dir = make_folder(tmp_path, {"a": (np.roll(ref, 1, 0), ref)})
  out = tmp_path / "res" / "summary.json"
  p = _cli(f"--pred_dir={pred_dir}", f"--ref_dir={ref_dir}", "--tolerances=1", f"--output={out}")
  assert p.returncode == 0, p.stderr
  assert "mean" in p.stdout and "0.7500" in p.stdout  # dice of the 1-voxel shift, by hand
  assert json.loads(out.read_text())["per_class"]["1"]["dice"] == pytest.approx(0.75)
  assert (tmp_path / "res" / "summary.csv").is_file()
  p = _cli(f"--pred_dir={pred_dir}", f"--ref_dir={tmp_path / 'nope'}")
  assert p.returncode == 1
  assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
  assert p.stderr.startswith("error: ") and "nope" in p.stderr
  # --cv gathers the folds' summaries (here one fold, the summary just written).
  fold = tmp_path / "exp" / "fold0" / "eval"
  fold.mkdir(parents=True)
  (fold / "summary.json").write_text(out.read_text())
  p = _cli(f"--cv={tmp_path / 'exp'}")
  assert p.returncode == 0, p.stderr
  assert "1 folds: fold0" in p.stdout and "0.7500 +- 0.0000" in p.stdout
  # Without NIfTI validation predictions there is nothing to decide postprocessing from.
  assert "no postprocessing decision" in p.stdout
  assert not (tmp_path / "exp" / "postprocessing.json").exists()
  rows = list(csv.DictReader((tmp_path / "exp" / "cv_summary.csv").open()))
  assert rows[-1]["class"] == "mean" and float(rows[-1]["dice_mean"]) == pytest.approx(0.75)


def test_importing_defines_no_flags():
  # Flags are defined only when run as a program (the training process defines its own).
  assert not {"pred_dir", "ref_dir", "tolerances", "chill", "cv"} & set(flags.FLAGS)
