r"""Scores a folder of predicted NIfTI label maps against references; the scoring command line.

    python -m vnet_jax.evaluate --pred_dir=P --ref_dir=R [--tolerances=flare22|MM] \
        [--dataset_json=dataset.json] [--output=P/summary.json] [--chill]
    python -m vnet_jax.evaluate --cv=runs/EXP

The scores are `scoring.evaluate_case`'s (FLARE22 rules, with the reference header's spacing and
axial axis), written by `summaries.write_summary`; `--cv` gathers the folds' summaries
(`summaries.cross_validation_summary`) and then, from the folds' validation predictions
(fold*/eval/predictions/*.nii.gz), decides per organ whether keeping only its largest connected
component raises its pooled cross-validated Dice (`postprocessing.decide`, nnU-Net's rule),
writing EXP/postprocessing.json, which `predict` applies. An experiment without any NIfTI
validation predictions gets the summaries only.

`evaluate_folder` pairs files by case id (file name without .nii/.nii.gz). As nnU-Net does, a
reference without a prediction is an error (`chill=True` / `--chill` scores only the predicted
cases, e.g. one fold's validation set against the full labelsTr); a prediction without a
reference is always an error.
"""

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from absl import flags, logging

from vnet_jax import cli, scoring, summaries
from vnet_jax.data import layouts
from vnet_jax.errors import DataError

# Predictions are written from the reference geometry; headers store float32, so allow
# rounding but nothing a reader would call a different grid.
AFFINE_ATOL_MM = 1e-3


def list_cases(folder: Path, what: str) -> dict[str, Path]:
  """{case id: path} of the NIfTI files in folder (other files are skipped); DataError if none."""
  if not folder.is_dir():
    raise DataError(f"{folder}: {what} folder does not exist")
  cases: dict[str, Path] = {}
  for path in sorted(folder.iterdir()):
    parts = layouts.split_nifti_name(path.name)
    if parts is None or not path.is_file():
      continue
    cid = parts[0]
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


def load_pair(
  pred_path: Path, ref_path: Path
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], int]:
  """(prediction, reference, the reference's spacing, its axial axis) of one case.

  DataError unless both are readable label maps on the same voxel grid (shape and affine).
  """
  ref, ref_affine, spacing = load_label(ref_path)
  pred, pred_affine, _ = load_label(pred_path)
  if pred.shape != ref.shape:
    raise DataError(
      f"{pred_path}: shape {pred.shape} differs from reference {ref_path} shape {ref.shape}"
    )
  if not np.allclose(pred_affine, ref_affine, rtol=0, atol=AFFINE_ATOL_MM):
    raise DataError(
      f"{pred_path}: affine differs from reference {ref_path} "
      f"(max difference {np.abs(pred_affine - ref_affine).max():.4g})"
    )
  try:
    axis = scoring.axial_axis(ref_affine)
  except ValueError:
    raise DataError(f"{ref_path}: cannot tell the axial axis from the affine") from None
  return pred, ref, spacing, axis


def class_names_from_dataset_json(path: str | Path) -> dict[int, str]:
  """Foreground {id: name} of an nnU-Net v2 dataset.json; its "ignore" label is not a class."""
  _, names, _ = layouts.read_dataset_json(Path(path))
  return {c: n for c, n in names.items() if c > 0 and n != "ignore"}


def _is_flare22_like(ref_dir: Path, case_ids: Iterable[str]) -> bool:
  # FLARE22Train/labels beside FLARE22Train/images, or FLARE22 case names.
  if ref_dir.name == "labels" and (ref_dir.parent / "images").is_dir():
    return True
  ids = list(case_ids)
  return bool(ids) and all(cid.upper().startswith("FLARE22") for cid in ids)


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
  refs = list_cases(ref_dir, "reference")
  preds = list_cases(pred_dir, "prediction")
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
      class_names = dict(layouts.FLARE22_CLASSES)
  fixed_ids = None
  if class_names is not None:
    class_names = {int(c): str(n) for c, n in class_names.items() if int(c) > 0}
    if not class_names:
      raise DataError(f"{ref_dir}: no foreground classes to score")
    if len(set(class_names.values())) != len(class_names):
      raise DataError(f"{ref_dir}: duplicate class names {sorted(class_names.values())}")
    fixed_ids = sorted(class_names)
    tols = scoring.resolve_tolerances(tolerances, fixed_ids, class_names)

  raw: dict[str, dict[int, dict[str, float]]] = {}
  pred_labels: dict[str, set[int]] = {}
  found: set[int] = set()
  for cid in case_ids:
    pred, ref, spacing, axis = load_pair(preds[cid], refs[cid])
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
      case_tols = scoring.resolve_tolerances(tolerances, ids, {})
    raw[cid] = scoring.evaluate_case(pred, ref, spacing, ids, case_tols, slice_axis=axis)
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
    scoring.resolve_tolerances(tolerances, fixed_ids, class_names)  # same errors as with names
    for cid in case_ids:
      for c in fixed_ids:
        if c not in raw[cid]:  # absent from this reference
          raw[cid][c] = scoring.absent_class_score(predicted=c in pred_labels[cid])
  return scoring.summarize(
    {cid: {class_names[c]: raw[cid][c] for c in fixed_ids} for cid in case_ids}
  )


# ---------------------------------------------------------------------------- command line


def _decide_postprocessing(exp_dir: Path) -> None:
  from vnet_jax import postprocessing  # it builds on this module's loaders

  folds = summaries.fold_dirs(exp_dir)
  predictions = [p for f in folds for p in (f / postprocessing.PREDICTIONS).glob("*")]
  if not any(layouts.split_nifti_name(p.name) for p in predictions):
    where = exp_dir / "fold*" / postprocessing.PREDICTIONS
    print(f"no postprocessing decision: no NIfTI validation predictions in {where}", flush=True)
    return
  print(f"deciding postprocessing from {len(folds)} folds' validation predictions", flush=True)
  decision = postprocessing.decide(exp_dir)
  path = postprocessing.write_decision(decision, exp_dir)
  print(postprocessing.format_decision(decision))
  print(f"wrote {path}")


def main(argv: list[str]) -> None:
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise DataError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.cv:
    cv = summaries.cross_validation_summary(FLAGS.cv)
    path_json, path_csv = summaries.write_cv_summary(cv, FLAGS.cv)
    print(summaries.format_cv_table(cv))
    print(f"wrote {path_json} and {path_csv}")
    _decide_postprocessing(Path(FLAGS.cv))
    return
  if not FLAGS.pred_dir or not FLAGS.ref_dir:
    raise DataError("pass --pred_dir and --ref_dir (or --cv=EXPERIMENT_DIR)")
  names = class_names_from_dataset_json(FLAGS.dataset_json) if FLAGS.dataset_json else None
  summary = evaluate_folder(
    FLAGS.pred_dir, FLAGS.ref_dir, names, FLAGS.tolerances, chill=FLAGS.chill
  )
  output = FLAGS.output or str(Path(FLAGS.pred_dir) / "summary.json")
  path_json, path_csv = summaries.write_summary(summary, output)
  print(summaries.format_table(summary))
  print(f"{len(summary['per_case'])} cases; wrote {path_json} and {path_csv}")


if __name__ == "__main__":
  flags.DEFINE_string("pred_dir", None, "Folder of predicted label maps (.nii.gz).")
  flags.DEFINE_string("ref_dir", None, "Folder of reference labels (FLARE22 labels/ or labelsTr/).")
  flags.DEFINE_string("tolerances", "flare22", "NSD tolerances: 'flare22' (per-organ table) or mm.")
  flags.DEFINE_string("dataset_json", None, "nnU-Net v2 dataset.json for class names (optional).")
  flags.DEFINE_string(
    "output", None, "summary.json path (default PRED_DIR/summary.json); the CSV goes beside it."
  )
  flags.DEFINE_bool(
    "chill",
    False,
    "Score only cases with a prediction (default: a reference without a prediction is an error).",
  )
  flags.DEFINE_string(
    "cv",
    None,
    "Experiment dir: gather fold*/eval/summary.json into cv_summary.json/.csv, then decide per "
    "organ from fold*/eval/predictions/*.nii.gz whether keeping its largest connected component "
    "raises its pooled validation Dice -> postprocessing.json (applied by predict).",
  )
  cli.run(main, huge_pages=False)
