"""FLARE22-style scores of label arrays, and their means over cases (no files, no flags).

Scoring follows the official FLARE22 scorer, per case and class:
- DSC, and NSD (DeepMind `surface-distance`, surface elements weighted by area) at the class's
  tolerance in mm, plus HD95 (`compute_robust_hausdorff(.., 95)`), all with the voxel spacing
  of the REFERENCE header.
- Class absent from reference and prediction: DSC = NSD = 1, HD95 = 0.
- Class in only one of them: DSC = NSD = 0, HD95 = NaN (no surface to measure from). NaN is
  skipped by the means, written as `null` in JSON and `nan` in CSV.
- Aorta (5), IVC (6) and esophagus (10) are scored only on the reference's labelled axial
  slice range of that class, first to last labelled slice inclusive. (The official script slices
  `z_lower:z_upper`, dropping the last labelled slice; that off-by-one is not reproduced.)
  The axial axis is the voxel axis closest to S/I in the reference affine (the 3rd axis for
  FLARE22 files).
"""

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage
from surface_distance import metrics as sd_metrics

from vnet_jax.data.layouts import FLARE22_TOLERANCES_MM
from vnet_jax.errors import DataError

SLICE_SCORED_CLASSES = frozenset({5, 6, 10})
METRICS = ("dice", "nsd", "hd95")


# ---------------------------------------------------------------------------- one case


def axial_axis(affine: np.ndarray) -> int:
  """Voxel axis whose direction is closest to S/I in world space (nibabel's io_orientation)."""
  ornt = nib.io_orientation(np.asarray(affine, np.float64))
  axes = [i for i in range(3) if ornt[i, 0] == 2]
  if len(axes) != 1:
    raise ValueError(f"cannot tell the axial axis from affine {np.asarray(affine).tolist()}")
  return axes[0]


def evaluate_case(
  pred: np.ndarray,
  ref: np.ndarray,
  spacing_mm: Sequence[float],
  class_ids: Iterable[int],
  tolerances_mm: Mapping[int, float],
  slice_scored_classes: Iterable[int] = SLICE_SCORED_CLASSES,
  slice_axis: int = 2,
  surface: bool = True,
) -> dict[int, dict[str, float]]:
  """FLARE22 scores of integer label maps `pred` vs `ref` (same voxel grid).

  spacing_mm: voxel size per array axis, from the reference header.
  slice_axis: the axial voxel axis for the slice rule: 2 for NIfTI arrays as nibabel loads
    FLARE22 files (the official scorer's choice), `axial_axis(ref_img.affine)` in general,
    0 for the package's internal (D, H, W) arrays.
  surface: False scores Dice only (NSD and HD95 NaN, no tolerances needed): the surface
    distances take over 90% of the time on a CT.
  Returns {class_id: {"dice", "nsd", "hd95"}} (floats; hd95 NaN where one side is empty).
  """
  pred = np.asarray(pred)
  ref = np.asarray(ref)
  if pred.ndim != 3 or pred.shape != ref.shape:
    raise ValueError(f"pred {pred.shape} and ref {ref.shape} must be 3D of the same shape")
  for name, a in (("pred", pred), ("ref", ref)):
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"{name} must hold integer labels, got {a.dtype}")
  spacing = tuple(float(s) for s in spacing_mm)
  if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
    raise ValueError(f"spacing_mm must be 3 positive numbers, got {spacing_mm}")
  class_ids = [int(c) for c in class_ids]
  if any(c <= 0 for c in class_ids):
    raise ValueError(f"class ids must be foreground (> 0), got {class_ids}")
  missing = [c for c in class_ids if surface and c not in tolerances_mm]
  if missing:
    raise ValueError(f"no NSD tolerance for class ids {missing}")
  if not class_ids:
    return {}
  slice_scored = {int(c) for c in slice_scored_classes}
  # One pass per volume gives every class's bounding box; all further work is on crops.
  max_label = max(class_ids)
  ref_boxes = ndimage.find_objects(ref, max_label=max_label)
  pred_boxes = ndimage.find_objects(pred, max_label=max_label)
  return {
    c: _score_class(
      pred,
      ref,
      c,
      ref_boxes[c - 1],
      pred_boxes[c - 1],
      spacing,
      float(tolerances_mm[c]) if surface else None,
      c in slice_scored,
      slice_axis,
    )
    for c in class_ids
  }


def absent_class_score(predicted: bool) -> dict[str, float]:
  """Scores of a class the reference lacks: all zero (HD95 NaN) if predicted, else perfect."""
  return _score(0.0, 0.0, math.nan) if predicted else _score(1.0, 1.0, 0.0)


def _score(dice: float, nsd: float, hd95: float) -> dict[str, float]:
  return {"dice": float(dice), "nsd": float(nsd), "hd95": float(hd95)}


def _score_class(pred, ref, c, rbox, pbox, spacing, tolerance, slice_scored, slice_axis):
  if rbox is None:
    return absent_class_score(predicted=pbox is not None)
  if pbox is None:
    return _score(0.0, 0.0, math.nan)
  box = [
    slice(max(min(r.start, p.start) - 1, 0), min(max(r.stop, p.stop) + 1, n))
    for r, p, n in zip(rbox, pbox, ref.shape)
  ]
  if slice_scored:
    # Only the reference's labelled slice range is scored; no margin along that axis, so
    # predicted voxels on other slices never enter the crop.
    box[slice_axis] = rbox[slice_axis]
  box = tuple(box)
  r = ref[box] == c
  p = pred[box] == c
  n_ref = int(np.count_nonzero(r))
  n_pred = int(np.count_nonzero(p))
  if n_pred == 0:  # the prediction lies only on slices that are not scored
    return _score(0.0, 0.0, math.nan)
  dice = 2.0 * np.count_nonzero(r & p) / (n_ref + n_pred)
  if tolerance is None:
    return _score(dice, math.nan, math.nan)
  with warnings.catch_warnings():
    # surface-distance 0.1 calls scipy.ndimage.filters/morphology (deprecated aliases).
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="surface_distance")
    dists = sd_metrics.compute_surface_distances(r, p, spacing)
  nsd = sd_metrics.compute_surface_dice_at_tolerance(dists, tolerance)
  hd95 = sd_metrics.compute_robust_hausdorff(dists, 95)
  return _score(dice, nsd, hd95)


def resolve_tolerances(
  tolerances: str | float | Mapping[int, float], class_ids: Iterable[int], names: Mapping[int, str]
) -> dict[int, float]:
  """{class_id: mm}: "flare22" = the FLARE22 table, a number = that for every class, or a dict."""
  class_ids = list(class_ids)
  if isinstance(tolerances, str):
    if tolerances.strip().lower() == "flare22":
      missing = [c for c in class_ids if c not in FLARE22_TOLERANCES_MM]
      if missing:
        listed = ", ".join(f"{c} ({names.get(c, c)})" for c in missing)
        raise DataError(
          f"no FLARE22 NSD tolerance for class id {listed}; give one in mm (--tolerances=MM)"
        )
      return {c: float(FLARE22_TOLERANCES_MM[c]) for c in class_ids}
    try:
      tolerances = float(tolerances)
    except ValueError:
      raise DataError(
        f"tolerances must be 'flare22' or a number of mm, got {tolerances!r}"
      ) from None
  if isinstance(tolerances, Mapping):
    missing = [c for c in class_ids if c not in tolerances]
    if missing:
      raise DataError(f"no NSD tolerance for class ids {missing}")
    out = {c: float(tolerances[c]) for c in class_ids}
  else:
    out = {c: float(tolerances) for c in class_ids}
  if not all(v >= 0 and math.isfinite(v) for v in out.values()):
    raise DataError(f"NSD tolerances must be non-negative mm, got {out}")
  return out


# ---------------------------------------------------------------------------- over cases


def _nanmean(values: Sequence[float]) -> float:
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  return float(v.mean()) if v.size else math.nan


def summarize(per_case_scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict:
  """{case: {class name: {dice, nsd, hd95}}} -> the summary.json structure.

  Per-class values are means over cases (NaN skipped); mean_dice / mean_nsd are means over
  classes of those per-class means.
  """
  cases = list(per_case_scores)
  names: list[str] = []
  for scores in per_case_scores.values():
    names += [n for n in scores if n not in names]
  per_class = {}
  for name in names:
    per_class[name] = {
      m: _nanmean([per_case_scores[c][name][m] for c in cases if name in per_case_scores[c]])
      for m in METRICS
    }
  return {
    "mean_dice": _nanmean([v["dice"] for v in per_class.values()]),
    "mean_nsd": _nanmean([v["nsd"] for v in per_class.values()]),
    "per_class": per_class,
    "per_case": [
      {"case": c, "per_class": {n: dict(s) for n, s in per_case_scores[c].items()}} for c in cases
    ],
  }
