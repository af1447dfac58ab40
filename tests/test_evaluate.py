"""FLARE22 scoring rules on tiny volumes whose expected scores are worked out by hand."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vnet_jax import evaluate as ev
from vnet_jax.errors import DataError

REPO = Path(__file__).resolve().parent.parent
TOL = {c: 2.0 for c in range(1, 15)}


def cube(shape=(10, 10, 10), lo=(3, 3, 3), size=4, label=1, dtype=np.uint8):
  a = np.zeros(shape, dtype)
  a[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = label
  return a


def save(path, arr, affine=None, spacing=(1.0, 1.0, 1.0)):
  if affine is None:
    affine = np.diag([*spacing, 1.0])
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(arr, np.uint8), affine), str(path))
  return path


# ---------------------------------------------------------------------------- evaluate_case rules


def test_absent_from_both_scores_one():
  ref = cube(label=1)
  r = ev.evaluate_case(ref, ref, (1, 1, 1), [1, 2], TOL)
  assert r[2] == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}


def test_prediction_only_and_reference_only_score_zero():
  empty = np.zeros((10, 10, 10), np.uint8)
  one = cube(label=3)
  pred_only = ev.evaluate_case(one, empty, (1, 1, 1), [3], TOL)[3]
  ref_only = ev.evaluate_case(empty, one, (1, 1, 1), [3], TOL)[3]
  for s in (pred_only, ref_only):
    assert s["dice"] == 0.0 and s["nsd"] == 0.0 and math.isnan(s["hd95"])


def test_perfect_prediction():
  ref = cube(label=4)
  s = ev.evaluate_case(ref.copy(), ref, (0.8, 0.8, 2.5), [4], TOL)[4]
  assert s == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cube_shifted_by_one_voxel(axis):
  spacing = [0.7, 0.9, 1.1]
  ref = cube()
  pred = np.roll(ref, 1, axis=axis)
  # 4x4x4 cube shifted by one voxel: overlap 3x4x4 voxels.
  expected_dice = np.float64(2 * 3 * 16) / np.float64(64 + 64)
  shift_mm = spacing[axis]

  def score(tol):
    return ev.evaluate_case(pred, ref, spacing, [1], {1: tol})[1]

  at = score(shift_mm)
  assert at["dice"] == pytest.approx(expected_dice, abs=1e-12)
  # Every surface point is within one shift of the other surface (the end faces exactly).
  assert at["nsd"] == pytest.approx(1.0, abs=1e-12)
  assert at["hd95"] == pytest.approx(shift_mm, abs=1e-9)
  below = score(shift_mm - 0.05)
  assert below["dice"] == at["dice"]
  assert 0.0 < below["nsd"] < 1.0


def test_anisotropic_spacing_changes_nsd():
  ref = cube()
  pred = np.roll(ref, 1, axis=2)  # one voxel along axis 2
  fine = ev.evaluate_case(pred, ref, (3.0, 3.0, 1.0), [1], {1: 2.0})[1]
  coarse = ev.evaluate_case(pred, ref, (1.0, 1.0, 3.0), [1], {1: 2.0})[1]
  assert fine["nsd"] == pytest.approx(1.0) and fine["hd95"] == pytest.approx(1.0)
  assert coarse["nsd"] < 1.0 and coarse["hd95"] == pytest.approx(3.0)
  assert fine["dice"] == coarse["dice"]  # Dice does not depend on spacing


def tube(z_lo, z_hi, label, shape=(8, 8, 12), axis=2):
  """A 2x2 column of `label` on slices z_lo..z_hi-1 along `axis`."""
  a = np.zeros(shape, np.uint8)
  idx = [slice(3, 5)] * 3
  idx[axis] = slice(z_lo, z_hi)
  a[tuple(idx)] = label
  return a


@pytest.mark.parametrize("c", [5, 6, 10])
def test_slice_rule_vessels_not_penalised_outside_labelled_slices(c):
  ref = tube(4, 8, c)  # labelled on slices 4..7
  pred = tube(0, 12, c)  # predicted on every slice
  s = ev.evaluate_case(pred, ref, (1, 1, 1), [c], TOL)[c]
  assert s == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}


def test_slice_rule_does_not_apply_to_liver():
  ref = tube(4, 8, 1)
  pred = tube(0, 12, 1)
  s = ev.evaluate_case(pred, ref, (1, 1, 1), [1], TOL)[1]
  # ref 4 slices x 4 voxels, pred 12 slices x 4 voxels, all of ref inside pred.
  assert s["dice"] == pytest.approx(2 * 16 / (16 + 48))
  assert s["nsd"] < 1.0


def test_slice_rule_still_penalises_missing_labelled_slices_and_off_range_only():
  ref = tube(4, 8, 5)
  partial = tube(6, 12, 5)  # covers labelled slices 6, 7 only
  s = ev.evaluate_case(partial, ref, (1, 1, 1), [5], TOL)[5]
  assert s["dice"] == pytest.approx(2 * 8 / (16 + 8))
  off = tube(9, 12, 5)  # only on unlabelled slices: nothing left to score
  s = ev.evaluate_case(off, ref, (1, 1, 1), [5], TOL)[5]
  assert s["dice"] == 0.0 and s["nsd"] == 0.0 and math.isnan(s["hd95"])


def test_slice_axis_argument():
  ref = tube(4, 8, 5, axis=0, shape=(12, 8, 8))
  pred = tube(0, 12, 5, axis=0, shape=(12, 8, 8))
  assert ev.evaluate_case(pred, ref, (1, 1, 1), [5], TOL, slice_axis=0)[5]["dice"] == 1.0
  assert ev.evaluate_case(pred, ref, (1, 1, 1), [5], TOL, slice_axis=2)[5]["dice"] == pytest.approx(
    2 * 16 / (16 + 48)
  )


def test_axial_axis_from_affine():
  assert ev.axial_axis(np.diag([0.8, 0.8, 2.5, 1])) == 2
  assert ev.axial_axis(np.diag([-0.8, -0.8, 2.5, 1])) == 2  # LPS-style flips keep the axis
  permuted = np.array([[0, 0, 0.8, 0], [0, 0.8, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])
  assert ev.axial_axis(permuted) == 0
  t = np.deg2rad(20)  # oblique: 20 degrees about the x axis, axis 1 still closest to S
  oblique = np.array(
    [[1, 0, 0, 0], [0, np.sin(t), np.cos(t), 0], [0, np.cos(t), -np.sin(t), 0], [0, 0, 0, 1.0]]
  )
  assert ev.axial_axis(oblique) == 1


def test_evaluate_case_matches_uncropped_surface_distance():
  # The per-class crop must not change any value the package gives on the full volumes.
  import warnings

  import surface_distance as sd

  rng = np.random.default_rng(0)
  ref = np.zeros((20, 18, 16), np.uint8)
  pred = np.zeros_like(ref)
  ref[2:12, 3:11, 4:12] = 1
  ref[12:18, 9:15, 2:9] = 2
  pred[3:13, 3:12, 4:11] = 1
  pred[11:18, 8:15, 3:9] = 2
  pred[rng.random(ref.shape) < 0.02] = 2
  spacing = (0.9, 1.3, 2.0)
  got = ev.evaluate_case(pred, ref, spacing, [1, 2], {1: 1.5, 2: 3.0})
  for c, tol in ((1, 1.5), (2, 3.0)):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      d = sd.compute_surface_distances(ref == c, pred == c, spacing)
    assert got[c]["nsd"] == pytest.approx(sd.compute_surface_dice_at_tolerance(d, tol), abs=1e-12)
    assert got[c]["hd95"] == pytest.approx(sd.compute_robust_hausdorff(d, 95), abs=1e-12)
    r, p = ref == c, pred == c
    assert got[c]["dice"] == pytest.approx(2 * (r & p).sum() / (r.sum() + p.sum()), abs=1e-12)


# ---------------------------------------------------------------------------- evaluate_folder


def make_folder(tmp_path, cases, ref_name="ref", spacing=(1.0, 1.0, 1.0), affine=None):
  """cases: {case_id: (pred, ref)}; returns (pred_dir, ref_dir)."""
  pred_dir, ref_dir = tmp_path / "pred", tmp_path / ref_name
  for cid, (pred, ref) in cases.items():
    save(ref_dir / f"{cid}.nii.gz", ref, affine, spacing)
    save(pred_dir / f"{cid}.nii.gz", pred, affine, spacing)
  return pred_dir, ref_dir


def test_evaluate_folder_structure_means_and_csv(tmp_path):
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
  exp_a = ev.evaluate_case(pred_a, ref_a, (1, 1, 1), [1, 2], {1: 1.5, 2: 1.5})
  exp_b = ev.evaluate_case(pred_b, ref_b, (1, 1, 1), [1, 2], {1: 1.5, 2: 1.5})
  assert summary["per_case"][0]["per_class"]["aorta"] == exp_a[2]
  assert summary["per_case"][1]["per_class"]["aorta"]["dice"] == 0.0
  for cid, name in ((1, "liver"), (2, "aorta")):
    for m in ("dice", "nsd"):
      assert summary["per_class"][name][m] == pytest.approx((exp_a[cid][m] + exp_b[cid][m]) / 2)
  # hd95 of a prediction-only class is NaN and skipped by the mean.
  assert summary["per_class"]["aorta"]["hd95"] == pytest.approx(exp_a[2]["hd95"])
  assert summary["mean_dice"] == pytest.approx(
    np.mean([summary["per_class"][n]["dice"] for n in ("liver", "aorta")])
  )
  assert summary["mean_nsd"] == pytest.approx(
    np.mean([summary["per_class"][n]["nsd"] for n in ("liver", "aorta")])
  )

  path_json, path_csv = ev.write_summary(summary, tmp_path / "out" / "summary.json")
  assert path_csv == tmp_path / "out" / "summary.csv"
  assert sorted(os.listdir(tmp_path / "out")) == ["summary.csv", "summary.json"]  # no tmp left
  loaded = json.loads(path_json.read_text())
  assert loaded["per_case"][1]["per_class"]["aorta"]["hd95"] is None  # NaN -> null
  assert loaded["mean_dice"] == pytest.approx(summary["mean_dice"])
  rows = list(csv.DictReader(path_csv.open()))
  assert [(r["case"], r["class"]) for r in rows] == [
    ("case_a", "liver"),
    ("case_a", "aorta"),
    ("case_b", "liver"),
    ("case_b", "aorta"),
  ]
  assert float(rows[0]["dice"]) == pytest.approx(exp_a[1]["dice"])
  assert math.isnan(float(rows[3]["hd95"]))


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
  assert got2["aorta"]["dice"] == pytest.approx(2 * 16 / (16 + 48))
  # Liver is shifted by one voxel along axis 2, 1 mm in both headers (FLARE22 liver tolerance
  # 5 mm); compare with a header whose axis-2 spacing is 6 mm: the shift then exceeds 5 mm.
  assert got["liver"]["nsd"] == pytest.approx(1.0)
  wide = np.diag([1.0, 1.0, 6.0, 1.0])
  p3, r3 = make_folder(tmp_path / "c", {"c": (pred, ref)}, affine=wide)
  got3 = ev.evaluate_folder(p3, r3, {1: "liver"})["per_case"][0]["per_class"]
  assert got3["liver"]["nsd"] < 1.0
  assert got3["liver"]["hd95"] == pytest.approx(6.0)
  assert got3["liver"]["dice"] == got["liver"]["dice"]


def test_class_names_dataset_json_flare22_and_ids(tmp_path):
  ref = cube(label=3)
  pred = cube(label=3)
  # nnU-Net layout: dataset.json beside labelsTr is read automatically.
  root = tmp_path / "Dataset001"
  pred_dir, ref_dir = make_folder(root, {"x_001": (pred, ref)}, ref_name="labelsTr")
  (root / "dataset.json").write_text(
    json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 3}, "file_ending": ".nii.gz"})
  )
  s = ev.evaluate_folder(pred_dir, ref_dir)
  assert list(s["per_class"]) == ["liver", "spleen"]
  assert s["per_class"]["liver"]["dice"] == 1.0  # absent from both
  # Explicit names from a v1-style dataset.json.
  v1 = tmp_path / "v1.json"
  v1.write_text(json.dumps({"labels": {"0": "background", "3": "milz"}}))
  assert ev.class_names_from_dataset_json(v1) == {3: "milz"}
  assert list(
    ev.evaluate_folder(pred_dir, ref_dir, ev.class_names_from_dataset_json(v1))["per_class"]
  ) == ["milz"]
  # FLARE22Train layout (labels/ beside images/): the FLARE22 table, all 13 organs.
  flare = tmp_path / "FLARE22Train"
  (flare / "images").mkdir(parents=True)
  pred_dir, ref_dir = make_folder(flare, {"case1": (pred, ref)}, ref_name="labels")
  s = ev.evaluate_folder(pred_dir, ref_dir)
  assert list(s["per_class"]) == [ev.FLARE22_CLASSES[c] for c in range(1, 14)]
  assert s["per_class"]["spleen"]["dice"] == 1.0
  assert s["mean_dice"] == 1.0
  # Anything else: labels found in any reference, named by id.
  ref2 = cube(label=2)
  pred_dir, ref_dir = make_folder(tmp_path / "plain", {"a": (pred, ref), "b": (ref2, ref2)})
  s = ev.evaluate_folder(pred_dir, ref_dir)
  assert list(s["per_class"]) == ["2", "3"]
  assert s["per_case"][0]["per_class"]["2"] == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}


def test_flare22_tolerances_and_numeric(tmp_path):
  assert ev.resolve_tolerances("flare22", [1, 5, 12], {}) == {1: 5.0, 5: 2.0, 12: 7.0}
  assert ev.resolve_tolerances("2.5", [1, 14], {}) == {1: 2.5, 14: 2.5}
  with pytest.raises(DataError, match="14"):
    ev.resolve_tolerances("flare22", [1, 14], {14: "tumour"})
  with pytest.raises(DataError, match="flare22"):
    ev.resolve_tolerances("fl", [1], {})


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


# ---------------------------------------------------------------------------- cross-validation


def test_cross_validation_summary(tmp_path):
  rng = np.random.default_rng(1)
  exp = tmp_path / "runs" / "exp"
  dice = rng.uniform(0.5, 1.0, (3, 2))
  nsd = rng.uniform(0.5, 1.0, (3, 2))
  hd = rng.uniform(1, 9, (3, 2))
  hd[1, 0] = np.nan
  for k in range(3):
    per_class = {
      n: {"dice": dice[k, i], "nsd": nsd[k, i], "hd95": hd[k, i]}
      for i, n in enumerate(["liver", "spleen"])
    }
    summary = ev.summarize({"c": per_class})
    ev.write_summary(summary, exp / f"fold{k}" / "eval" / "summary.json")
  cv = ev.cross_validation_summary(exp)
  assert cv["folds"] == ["fold0", "fold1", "fold2"]
  for i, n in enumerate(["liver", "spleen"]):
    assert cv["per_class"][n]["dice"]["mean"] == pytest.approx(np.mean(dice[:, i]))
    assert cv["per_class"][n]["dice"]["std"] == pytest.approx(np.std(dice[:, i]))
    assert cv["per_class"][n]["nsd"]["std"] == pytest.approx(np.std(nsd[:, i]))
    assert cv["per_class"][n]["hd95"]["mean"] == pytest.approx(np.nanmean(hd[:, i]))
  fold_means = dice.mean(axis=1)
  assert cv["mean_dice"]["mean"] == pytest.approx(np.mean(fold_means))
  assert cv["mean_dice"]["std"] == pytest.approx(np.std(fold_means))
  assert cv["mean_nsd"]["std"] == pytest.approx(np.std(nsd.mean(axis=1)))
  path_json, path_csv = ev.write_cv_summary(cv, exp)
  assert json.loads(path_json.read_text())["folds"] == cv["folds"]
  rows = list(csv.DictReader(path_csv.open()))
  assert [r["class"] for r in rows] == ["liver", "spleen", "mean"]
  assert float(rows[2]["dice_std"]) == pytest.approx(np.std(fold_means))
  # A fold without its summary is a one-line error naming the file.
  (exp / "fold3" / "eval").mkdir(parents=True)
  with pytest.raises(DataError, match=r"fold3/eval/summary\.json"):
    ev.cross_validation_summary(exp)
  (exp / "fold3" / "eval" / "summary.json").write_text("{not json")
  with pytest.raises(DataError, match=r"fold3/eval/summary\.json: unreadable"):
    ev.cross_validation_summary(exp)


# ---------------------------------------------------------------------------- command line


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "vnet_jax.evaluate", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


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
  assert "nope" in p.stderr
