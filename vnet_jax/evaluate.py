r"""FLARE22-style scoring of predicted label maps, and the cross-validation table.

    python -m vnet_jax.evaluate --pred_dir=P --ref_dir=R [--tolerances=flare22|MM] \
        [--dataset_json=dataset.json] [--output=P/summary.json] [--chill]
    python -m vnet_jax.evaluate --cv=runs/EXP

Scoring follows the official FLARE22 scorer (FACTS.md section 1), per case and class:
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

`evaluate_folder` pairs files by case id (file name without .nii/.nii.gz). As nnU-Net does, a
reference without a prediction is an error (`chill=True` / `--chill` scores only the predicted
cases, e.g. one fold's validation set against the full labelsTr); a prediction without a
reference is always an error.
"""

import csv
import io
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from absl import logging
from scipy import ndimage
from surface_distance import metrics as sd_metrics

from vnet_jax.data.layouts import FLARE22_CLASSES, FLARE22_TOLERANCES_MM
from vnet_jax.errors import DataError
from vnet_jax.files import write_json_atomic, write_text_atomic

SLICE_SCORED_CLASSES = frozenset({5, 6, 10})
METRICS = ("dice", "nsd", "hd95")
# Predictions are written from the reference geometry; headers store float32, so allow
# rounding but nothing a reader would call a different grid.
AFFINE_ATOL_MM = 1e-3


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
) -> dict[int, dict[str, float]]:
  """FLARE22 scores of integer label maps `pred` vs `ref` (same voxel grid).

  spacing_mm: voxel size per array axis, from the reference header.
  slice_axis: the axial voxel axis for the slice rule: 2 for NIfTI arrays as nibabel loads
    FLARE22 files (the official scorer's choice), `axial_axis(ref_img.affine)` in general,
    0 for the package's internal (D, H, W) arrays.
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
  missing = [c for c in class_ids if c not in tolerances_mm]
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
      float(tolerances_mm[c]),
      c in slice_scored,
      slice_axis,
    )
    for c in class_ids
  }


def _score(dice: float, nsd: float, hd95: float) -> dict[str, float]:
  return {"dice": float(dice), "nsd": float(nsd), "hd95": float(hd95)}


def _score_class(pred, ref, c, rbox, pbox, spacing, tolerance, slice_scored, slice_axis):
  if rbox is None and pbox is None:
    return _score(1.0, 1.0, 0.0)
  if rbox is None or pbox is None:
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
  with warnings.catch_warnings():
    # surface-distance 0.1 calls scipy.ndimage.filters/morphology (deprecated aliases).
    warnings.simplefilter("ignore", DeprecationWarning)
    dists = sd_metrics.compute_surface_distances(r, p, spacing)
  nsd = sd_metrics.compute_surface_dice_at_tolerance(dists, tolerance)
  hd95 = sd_metrics.compute_robust_hausdorff(dists, 95)
  return _score(dice, nsd, hd95)


# ---------------------------------------------------------------------------- files


def case_id_of(path: str | Path) -> str | None:
  """Case id of a NIfTI file name (without .nii / .nii.gz), None for other files."""
  name = Path(path).name
  for ext in (".nii.gz", ".nii"):
    if name.endswith(ext) and len(name) > len(ext):
      return name[: -len(ext)]
  return None


def _list_cases(folder: Path, what: str) -> dict[str, Path]:
  if not folder.is_dir():
    raise DataError(f"{folder}: {what} folder does not exist")
  cases: dict[str, Path] = {}
  for path in sorted(folder.iterdir()):
    cid = case_id_of(path)
    if cid is None or not path.is_file():
      continue
    if cid in cases:
      raise DataError(f"{path}: case id {cid!r} also in {cases[cid].name}")
    cases[cid] = path
  if not cases:
    raise DataError(f"{folder}: no .nii/.nii.gz {what} files")
  return cases


def load_label(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
  """(integer labels as stored, affine, spacing of the 3 voxel axes in mm); DataError if bad."""
  try:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    affine = np.asarray(img.affine, np.float64)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
  except Exception as e:  # nibabel, gzip and OS errors alike mean "cannot read this file"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f"{path}: cannot read NIfTI ({msg})") from None
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise DataError(f"{path}: label map must be 3D, got shape {data.shape}")
  if len(zooms) != 3 or not all(z > 0 and math.isfinite(z) for z in zooms):
    raise DataError(f"{path}: invalid voxel spacing {zooms} in header")
  if not np.issubdtype(data.dtype, np.integer) and (
    not np.issubdtype(data.dtype, np.floating)
    or not np.all(np.isfinite(data))
    or not np.array_equal(data, np.round(data))
  ):
    raise DataError(f"{path}: label values must be integers (dtype {data.dtype})")
  if data.size and data.min() < 0:
    raise DataError(f"{path}: negative label value {data.min()}")
  top = int(data.max()) if data.size else 0
  data = data.astype(np.uint8 if top < 256 else np.int32, copy=False)
  return data, affine, zooms


def class_names_from_dataset_json(path: str | Path) -> dict[int, str]:
  """Foreground {id: name} from an nnU-Net dataset.json (v2 `name: id`, or v1/MSD `"id": name`).

  The nnU-Net v2 "ignore" label is not a class and is left out.
  """
  try:
    labels = json.loads(Path(path).read_text())["labels"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(
      f"{path}: cannot read 'labels' from dataset.json ({type(e).__name__})"
    ) from None
  if not isinstance(labels, dict):
    raise DataError(f"{path}: 'labels' must be an object")
  names: dict[int, str] = {}
  for k, v in labels.items():
    if isinstance(v, int) and not isinstance(v, bool):
      cid, name = v, str(k)
    elif isinstance(v, str) and re.fullmatch(r"\d+", str(k)):
      cid, name = int(k), v
    elif isinstance(v, list):
      raise DataError(f"{path}: region-based label {k!r} is not supported by evaluation")
    else:
      raise DataError(f"{path}: cannot read label entry {k!r}: {v!r}")
    if cid > 0 and name != "ignore":
      names[cid] = name
  if not names:
    raise DataError(f"{path}: no foreground labels")
  return dict(sorted(names.items()))


def _is_flare22_like(ref_dir: Path, case_ids: Iterable[str]) -> bool:
  # FLARE22Train/labels beside FLARE22Train/images, or FLARE22 case names.
  if ref_dir.name == "labels" and (ref_dir.parent / "images").is_dir():
    return True
  ids = list(case_ids)
  return bool(ids) and all(cid.upper().startswith("FLARE22") for cid in ids)


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


def _nanmean(values: Sequence[float]) -> float:
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  return float(v.mean()) if v.size else math.nan


def evaluate_folder(
  pred_dir: str | Path,
  ref_dir: str | Path,
  class_names: Mapping[int, str] | None = None,
  tolerances: str | float | Mapping[int, float] = "flare22",
  chill: bool = False,
  verbose: bool = False,
) -> dict:
  """Scores every prediction in pred_dir against the reference of the same case id.

  class_names: {id: name} of the classes to score (foreground ids). None: the dataset.json
    next to ref_dir (nnU-Net labelsTr), else the FLARE22 table for a FLARE22-like reference set,
    else every nonzero label found in any reference, named by its id ("3").
  chill: score only the cases that have a prediction instead of requiring all references.
  Returns {"mean_dice", "mean_nsd", "per_class": {name: {dice, nsd, hd95}}, "per_case": [...]}.
  Reference labels that are not scored classes count as background.
  """
  pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
  refs = _list_cases(ref_dir, "reference")
  preds = _list_cases(pred_dir, "prediction")
  for cid, path in preds.items():
    if cid not in refs:
      raise DataError(f"{path}: no reference {cid}.nii.gz (or .nii) in {ref_dir}")
  missing = [cid for cid in refs if cid not in preds]
  if missing and not chill:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise DataError(
      f"{pred_dir / (missing[0] + '.nii.gz')}: missing prediction for reference "
      f"{refs[missing[0]]}{more} (use --chill to score only predicted cases)"
    )
  case_ids = sorted(preds)

  if class_names is None:
    if (ref_dir.parent / "dataset.json").is_file():
      class_names = class_names_from_dataset_json(ref_dir.parent / "dataset.json")
    elif _is_flare22_like(ref_dir, refs):
      class_names = dict(FLARE22_CLASSES)
  fixed_ids = None
  if class_names is not None:
    class_names = {int(c): str(n) for c, n in class_names.items() if int(c) > 0}
    if not class_names:
      raise DataError(f"{ref_dir}: no foreground classes to score")
    if len(set(class_names.values())) != len(class_names):
      raise DataError(f"{ref_dir}: duplicate class names {sorted(class_names.values())}")
    fixed_ids = sorted(class_names)
    tols = resolve_tolerances(tolerances, fixed_ids, class_names)

  raw: dict[str, dict[int, dict[str, float]]] = {}
  pred_labels: dict[str, set[int]] = {}
  found: set[int] = set()
  for cid in case_ids:
    ref, ref_affine, spacing = load_label(refs[cid])
    pred, pred_affine, _ = load_label(preds[cid])
    if pred.shape != ref.shape:
      raise DataError(
        f"{preds[cid]}: shape {pred.shape} differs from reference {refs[cid]} shape {ref.shape}"
      )
    if not np.allclose(pred_affine, ref_affine, rtol=0, atol=AFFINE_ATOL_MM):
      raise DataError(
        f"{preds[cid]}: affine differs from reference {refs[cid]} "
        f"(max difference {np.abs(pred_affine - ref_affine).max():.4g})"
      )
    try:
      axis = axial_axis(ref_affine)
    except ValueError:
      raise DataError(f"{refs[cid]}: cannot tell the axial axis from the affine") from None
    ref_present = {int(c) for c in np.flatnonzero(np.bincount(ref.ravel())) if c > 0}
    pred_present = {int(c) for c in np.flatnonzero(np.bincount(pred.ravel())) if c > 0}
    found |= ref_present
    pred_labels[cid] = pred_present
    if fixed_ids is not None:
      ids, case_tols = fixed_ids, tols
    else:
      # Classes are known only after every reference is read: score what this case has and
      # fill the other classes afterwards (they are then absent from this reference).
      ids = sorted(ref_present | pred_present)
      case_tols = resolve_tolerances(tolerances, ids, {})
    raw[cid] = evaluate_case(pred, ref, spacing, ids, case_tols, slice_axis=axis)
    if verbose:
      print(f"{cid}: " + " ".join(f"{c}:{s['dice']:.3f}" for c, s in raw[cid].items()), flush=True)

  unscored = sorted(found - set(fixed_ids or found))
  if unscored:
    logging.warning("reference labels %s are not scored classes: counted as background", unscored)
  if fixed_ids is None:
    if not found:
      raise DataError(f"{ref_dir}: no foreground label in any reference")
    fixed_ids = sorted(found)
    class_names = {c: str(c) for c in fixed_ids}
    resolve_tolerances(tolerances, fixed_ids, class_names)  # same errors as with names given
    for cid in case_ids:
      for c in fixed_ids:
        if c not in raw[cid]:  # absent from this reference
          raw[cid][c] = (
            _score(0.0, 0.0, math.nan) if c in pred_labels[cid] else _score(1.0, 1.0, 0.0)
          )
  return summarize({cid: {class_names[c]: raw[cid][c] for c in fixed_ids} for cid in case_ids})


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


# ---------------------------------------------------------------------------- writing


def _json_safe(obj):
  # NaN / inf are not JSON: written as null.
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, Mapping):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, np.generic):
    return _json_safe(obj.item())
  return obj


def _fmt_csv(x) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "nan"
  return repr(float(x))


def write_summary(summary: dict, path_json: str | Path) -> tuple[Path, Path]:
  """Writes summary.json and, beside it with the same stem, a CSV (case,class,dice,nsd,hd95).

  Both atomically (temporary file + os.replace); the CSV first, so a summary.json that exists
  always has its CSV. Returns (json path, csv path).
  """
  path_json = Path(path_json)
  path_csv = path_json.with_suffix(".csv")
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["case", "class", *METRICS])
  for case in summary["per_case"]:
    for name, s in case["per_class"].items():
      w.writerow([case["case"], name, *(_fmt_csv(s.get(m)) for m in METRICS)])
  write_text_atomic(path_csv, buf.getvalue())
  write_json_atomic(path_json, _json_safe(summary))
  return path_json, path_csv


def _num(x) -> float:
  return math.nan if x is None else float(x)


def format_table(summary: dict) -> str:
  lines = [f"{'class':<24}{'dice':>8}{'nsd':>8}{'hd95':>9}"]
  for name, s in summary["per_class"].items():
    lines.append(
      f"{name:<24}{_num(s.get('dice')):>8.4f}{_num(s.get('nsd')):>8.4f}{_num(s.get('hd95')):>9.2f}"
    )
  lines.append(
    f"{'mean':<24}{_num(summary['mean_dice']):>8.4f}{_num(summary.get('mean_nsd')):>8.4f}"
  )
  return "\n".join(lines)


# ---------------------------------------------------------------------------- cross-validation


def _fold_key(path: Path):
  digits = re.findall(r"\d+", path.name)
  return (0, int(digits[0]), path.name) if digits else (1, 0, path.name)


def _read_summary(path: Path) -> dict:
  if not path.is_file():
    raise DataError(f"{path}: missing fold summary")
  try:
    s = json.loads(path.read_text())
    per_class = s["per_class"]
    mean_dice = _num(s["mean_dice"])
    mean_nsd = _num(s.get("mean_nsd"))
    per_class = {str(name): {m: _num(v.get(m)) for m in METRICS} for name, v in per_class.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DataError(
      f"{path}: unreadable fold summary ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''})"
    ) from None
  return {"mean_dice": mean_dice, "mean_nsd": mean_nsd, "per_class": per_class}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
  # Population std (ddof=0) over folds, NaN skipped.
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  if not v.size:
    return {"mean": math.nan, "std": math.nan}
  return {"mean": float(v.mean()), "std": float(v.std())}


def cross_validation_summary(exp_dir: str | Path) -> dict:
  """Gathers exp_dir/fold*/eval/summary.json into mean and std over folds.

  Returns {"folds": [names], "mean_dice": {mean, std}, "mean_nsd": {mean, std},
  "per_class": {name: {dice|nsd|hd95: {mean, std}}}, "per_fold": [{fold, mean_dice, mean_nsd}]}.
  The overall mean is the mean of the folds' mean_dice, its std the std of those fold means.
  Std is numpy's default (population, ddof=0); metrics a fold does not report are skipped.
  """
  exp_dir = Path(exp_dir)
  if not exp_dir.is_dir():
    raise DataError(f"{exp_dir}: experiment directory does not exist")
  folds = sorted((p for p in exp_dir.glob("fold*") if p.is_dir()), key=_fold_key)
  if not folds:
    raise DataError(f"{exp_dir}: no fold*/ directories")
  summaries = [_read_summary(f / "eval" / "summary.json") for f in folds]
  names: list[str] = []
  for s in summaries:
    names += [n for n in s["per_class"] if n not in names]
  per_class = {
    name: {
      m: _mean_std(
        [s["per_class"][name][m] if name in s["per_class"] else math.nan for s in summaries]
      )
      for m in METRICS
    }
    for name in names
  }
  return {
    "folds": [f.name for f in folds],
    "mean_dice": _mean_std([s["mean_dice"] for s in summaries]),
    "mean_nsd": _mean_std([s["mean_nsd"] for s in summaries]),
    "per_class": per_class,
    "per_fold": [
      {"fold": f.name, "mean_dice": s["mean_dice"], "mean_nsd": s["mean_nsd"]}
      for f, s in zip(folds, summaries)
    ],
  }


def write_cv_summary(cv: dict, exp_dir: str | Path) -> tuple[Path, Path]:
  """exp_dir/cv_summary.json and cv_summary.csv (one row per class, then 'mean'), atomically."""
  exp_dir = Path(exp_dir)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["class", *(f"{m}_{k}" for m in METRICS for k in ("mean", "std"))])
  for name, s in cv["per_class"].items():
    w.writerow([name, *(_fmt_csv(s[m][k]) for m in METRICS for k in ("mean", "std"))])
  w.writerow(
    [
      "mean",
      _fmt_csv(cv["mean_dice"]["mean"]),
      _fmt_csv(cv["mean_dice"]["std"]),
      _fmt_csv(cv["mean_nsd"]["mean"]),
      _fmt_csv(cv["mean_nsd"]["std"]),
      "nan",
      "nan",
    ]
  )
  path_csv, path_json = exp_dir / "cv_summary.csv", exp_dir / "cv_summary.json"
  write_text_atomic(path_csv, buf.getvalue())
  write_json_atomic(path_json, _json_safe(cv))
  return path_json, path_csv


def format_cv_table(cv: dict) -> str:
  def ms(d, prec=4):
    return f"{d['mean']:.{prec}f} +- {d['std']:.{prec}f}"

  lines = [
    f"{len(cv['folds'])} folds: {', '.join(cv['folds'])}",
    f"{'class':<24}{'dice':>18}{'nsd':>18}{'hd95':>18}",
  ]
  for name, s in cv["per_class"].items():
    lines.append(f"{name:<24}{ms(s['dice']):>18}{ms(s['nsd']):>18}{ms(s['hd95'], 2):>18}")
  lines.append(f"{'mean':<24}{ms(cv['mean_dice']):>18}{ms(cv['mean_nsd']):>18}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- command line


def _define_flags():
  # Defined only when run as a program, so importing this module adds no global flags.
  from absl import flags

  flags.DEFINE_string("pred_dir", None, "Folder of predicted label maps (.nii.gz).")
  flags.DEFINE_string("ref_dir", None, "Folder of reference labels (FLARE22 labels/ or labelsTr/).")
  flags.DEFINE_string("tolerances", "flare22", "NSD tolerances: 'flare22' (per-organ table) or mm.")
  flags.DEFINE_string("dataset_json", None, "nnU-Net dataset.json for class names (optional).")
  flags.DEFINE_string(
    "output", None, "summary.json path (default PRED_DIR/summary.json); the CSV goes beside it."
  )
  flags.DEFINE_bool(
    "chill",
    False,
    "Score only cases with a prediction (default: a reference without a prediction is an error).",
  )
  flags.DEFINE_string(
    "cv", None, "Experiment dir: gather fold*/eval/summary.json into cv_summary.json/.csv."
  )
  return flags.FLAGS


def main(argv: list[str]) -> int:
  from absl import flags

  FLAGS = flags.FLAGS
  try:
    if len(argv) > 1:
      raise DataError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.cv:
      cv = cross_validation_summary(FLAGS.cv)
      path_json, path_csv = write_cv_summary(cv, FLAGS.cv)
      print(format_cv_table(cv))
      print(f"wrote {path_json} and {path_csv}")
      return 0
    if not FLAGS.pred_dir or not FLAGS.ref_dir:
      raise DataError("pass --pred_dir and --ref_dir (or --cv=EXPERIMENT_DIR)")
    names = class_names_from_dataset_json(FLAGS.dataset_json) if FLAGS.dataset_json else None
    summary = evaluate_folder(
      FLAGS.pred_dir, FLAGS.ref_dir, names, FLAGS.tolerances, chill=FLAGS.chill
    )
    output = FLAGS.output or str(Path(FLAGS.pred_dir) / "summary.json")
    path_json, path_csv = write_summary(summary, output)
    print(format_table(summary))
    print(f"{len(summary['per_case'])} cases; wrote {path_json} and {path_csv}")
    return 0
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
