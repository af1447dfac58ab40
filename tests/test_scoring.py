"""FLARE22 scoring rules on tiny volumes whose expected scores are worked out by hand."""

import math
import warnings

import numpy as np
import pytest
import surface_distance as sd

from tests.label_volumes import cube, tube
from vnet_jax import scoring
from vnet_jax.errors import DataError

TOL = {c: 2.0 for c in range(1, 15)}


# ---------------------------------------------------------------------------- evaluate_case rules


def test_absent_from_both_scores_one():
  ref = cube(label=1)
  r = scoring.evaluate_case(ref, ref, (1, 1, 1), [1, 2], TOL)
  assert r[2] == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}


def test_prediction_only_and_reference_only_score_zero():
  empty = np.zeros((10, 10, 10), np.uint8)
  one = cube(label=3)
  pred_only = scoring.evaluate_case(one, empty, (1, 1, 1), [3], TOL)[3]
  ref_only = scoring.evaluate_case(empty, one, (1, 1, 1), [3], TOL)[3]
  for s in (pred_only, ref_only):
    assert s["dice"] == 0.0 and s["nsd"] == 0.0 and math.isnan(s["hd95"])


def test_absent_class_score_is_the_rule_evaluate_case_applies():
  empty = np.zeros((10, 10, 10), np.uint8)
  predicted = scoring.evaluate_case(cube(label=3), empty, (1, 1, 1), [3], TOL)[3]
  assert scoring.absent_class_score(predicted=False) == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}
  got = scoring.absent_class_score(predicted=True)
  assert got["dice"] == predicted["dice"] == 0.0 and got["nsd"] == predicted["nsd"] == 0.0
  assert math.isnan(got["hd95"]) and math.isnan(predicted["hd95"])


def test_perfect_prediction():
  ref = cube(label=4)
  s = scoring.evaluate_case(ref.copy(), ref, (0.8, 0.8, 2.5), [4], TOL)[4]
  assert s == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cube_shifted_by_one_voxel(axis):
  spacing = [0.7, 0.9, 1.1]
  ref = cube()
  pred = np.roll(ref, 1, axis=axis)
  # 4x4x4 cube shifted by one voxel: overlap 3x4x4 voxels.
  expected_dice = np.float64(2 * 3 * 16) / np.float64(64 + 64)
  shift_mm = np.float64(spacing[axis])

  def score(tol):
    return scoring.evaluate_case(pred, ref, spacing, [1], {1: tol})[1]

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
  fine = scoring.evaluate_case(pred, ref, (3.0, 3.0, 1.0), [1], {1: 2.0})[1]
  coarse = scoring.evaluate_case(pred, ref, (1.0, 1.0, 3.0), [1], {1: 2.0})[1]
  assert fine["nsd"] == pytest.approx(1.0) and fine["hd95"] == pytest.approx(1.0)
  assert coarse["nsd"] < 1.0 and coarse["hd95"] == pytest.approx(3.0)
  assert fine["dice"] == coarse["dice"]  # Dice does not depend on spacing


@pytest.mark.parametrize("c", [5, 6, 10])
def test_slice_rule_vessels_not_penalised_outside_labelled_slices(c):
  ref = tube(4, 8, c)  # labelled on slices 4..7
  pred = tube(0, 12, c)  # predicted on every slice
  s = scoring.evaluate_case(pred, ref, (1, 1, 1), [c], TOL)[c]
  assert s == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}


def test_slice_rule_does_not_apply_to_liver():
  ref = tube(4, 8, 1)
  pred = tube(0, 12, 1)
  s = scoring.evaluate_case(pred, ref, (1, 1, 1), [1], TOL)[1]
  # ref 4 slices x 4 voxels, pred 12 slices x 4 voxels, all of ref inside pred.
  assert s["dice"] == pytest.approx(np.float64(2 * 16) / np.float64(16 + 48), abs=1e-12)
  assert s["nsd"] < 1.0


def test_slice_rule_still_penalises_missing_labelled_slices_and_off_range_only():
  ref = tube(4, 8, 5)
  partial = tube(6, 12, 5)  # covers labelled slices 6, 7 only
  s = scoring.evaluate_case(partial, ref, (1, 1, 1), [5], TOL)[5]
  assert s["dice"] == pytest.approx(np.float64(2 * 8) / np.float64(16 + 8), abs=1e-12)
  off = tube(9, 12, 5)  # only on unlabelled slices: nothing left to score
  s = scoring.evaluate_case(off, ref, (1, 1, 1), [5], TOL)[5]
  assert s["dice"] == 0.0 and s["nsd"] == 0.0 and math.isnan(s["hd95"])


def test_slice_axis_argument():
  ref = tube(4, 8, 5, axis=0, shape=(12, 8, 8))
  pred = tube(0, 12, 5, axis=0, shape=(12, 8, 8))
  assert scoring.evaluate_case(pred, ref, (1, 1, 1), [5], TOL, slice_axis=0)[5]["dice"] == 1.0
  got = scoring.evaluate_case(pred, ref, (1, 1, 1), [5], TOL, slice_axis=2)[5]["dice"]
  assert got == pytest.approx(np.float64(2 * 16) / np.float64(16 + 48), abs=1e-12)


def test_axial_axis_from_affine():
  assert scoring.axial_axis(np.diag([0.8, 0.8, 2.5, 1])) == 2
  assert scoring.axial_axis(np.diag([-0.8, -0.8, 2.5, 1])) == 2  # LPS-style flips keep the axis
  permuted = np.array([[0, 0, 0.8, 0], [0, 0.8, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])
  assert scoring.axial_axis(permuted) == 0
  t = np.deg2rad(20)  # oblique: 20 degrees about the x axis, axis 1 still closest to S
  oblique = np.array(
    [[1, 0, 0, 0], [0, np.sin(t), np.cos(t), 0], [0, np.cos(t), -np.sin(t), 0], [0, 0, 0, 1.0]]
  )
  assert scoring.axial_axis(oblique) == 1


def test_evaluate_case_matches_uncropped_surface_distance():
  # The per-class crop must not change any value the package gives on the full volumes.
  rng = np.random.default_rng(0)
  ref = np.zeros((20, 18, 16), np.uint8)
  pred = np.zeros_like(ref)
  ref[2:12, 3:11, 4:12] = 1
  ref[12:18, 9:15, 2:9] = 2
  pred[3:13, 3:12, 4:11] = 1
  pred[11:18, 8:15, 3:9] = 2
  pred[rng.random(ref.shape) < 0.02] = 2
  spacing = (0.9, 1.3, 2.0)
  got = scoring.evaluate_case(pred, ref, spacing, [1, 2], {1: 1.5, 2: 3.0})
  for c, tol in ((1, 1.5), (2, 3.0)):
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", category=DeprecationWarning, module="surface_distance")
      d = sd.compute_surface_distances(ref == c, pred == c, spacing)
    assert got[c]["nsd"] == pytest.approx(sd.compute_surface_dice_at_tolerance(d, tol), abs=1e-12)
    assert got[c]["hd95"] == pytest.approx(sd.compute_robust_hausdorff(d, 95), abs=1e-12)
    r, p = ref == c, pred == c
    expected = 2 * np.float64((r & p).sum()) / np.float64(r.sum() + p.sum())
    assert got[c]["dice"] == pytest.approx(expected, abs=1e-12)


def test_dice_only_scoring_equals_full_dice_and_skips_surfaces(monkeypatch):
  rng = np.random.default_rng(1)
  ref = rng.integers(0, 7, (12, 10, 9)).astype(np.uint8)
  pred = np.where(rng.random(ref.shape) < 0.3, rng.integers(0, 7, ref.shape), ref).astype(np.uint8)
  ids = [1, 2, 3, 5, 6]  # 5 and 6 follow the slice rule
  full = scoring.evaluate_case(pred, ref, (1.0, 1.2, 2.5), ids, TOL, slice_axis=0)
  monkeypatch.setattr(scoring.sd_metrics, "compute_surface_distances", None)  # must not be called
  fast = scoring.evaluate_case(pred, ref, (1.0, 1.2, 2.5), ids, {}, slice_axis=0, surface=False)
  for c in ids:
    assert fast[c]["dice"] == full[c]["dice"]
    assert math.isnan(fast[c]["nsd"]) and math.isnan(fast[c]["hd95"])


# ---------------------------------------------------------------------------- tolerances, means


def test_flare22_tolerances_and_numeric():
  assert scoring.resolve_tolerances("flare22", [1, 5, 12], {}) == {1: 5.0, 5: 2.0, 12: 7.0}
  assert scoring.resolve_tolerances("2.5", [1, 14], {}) == {1: 2.5, 14: 2.5}
  assert scoring.resolve_tolerances({1: 4, 2: 1.5}, [2], {}) == {2: 1.5}
  with pytest.raises(DataError, match="14"):
    scoring.resolve_tolerances("flare22", [1, 14], {14: "tumour"})
  with pytest.raises(DataError, match="flare22"):
    scoring.resolve_tolerances("fl", [1], {})
  with pytest.raises(DataError, match="non-negative"):
    scoring.resolve_tolerances(-1.0, [1], {})


def test_summarize_means_skip_nan():
  rng = np.random.default_rng(2)
  vals = rng.uniform(0, 1, (3, 2, 3))  # case, class, metric
  vals[1, 0, 2] = np.nan  # one HD95 missing
  names = ["liver", "spleen"]
  per_case = {
    f"c{k}": {n: dict(zip(scoring.METRICS, map(float, vals[k, i]))) for i, n in enumerate(names)}
    for k in range(3)
  }
  del per_case["c2"]["spleen"]  # a class a case does not report is left out of its mean
  s = scoring.summarize(per_case)
  assert [c["case"] for c in s["per_case"]] == ["c0", "c1", "c2"]
  assert s["per_case"][2]["per_class"] == per_case["c2"]
  expected = {
    "liver": np.nanmean(vals[:, 0], axis=0),
    "spleen": np.nanmean(vals[:2, 1], axis=0),
  }
  for n in names:
    for j, m in enumerate(scoring.METRICS):
      assert s["per_class"][n][m] == pytest.approx(expected[n][j], abs=1e-12)
  assert s["mean_dice"] == pytest.approx(np.mean([expected[n][0] for n in names]), abs=1e-12)
  assert s["mean_nsd"] == pytest.approx(np.mean([expected[n][1] for n in names]), abs=1e-12)
