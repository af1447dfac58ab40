"""Keeping each organ's largest connected component, where cross-validation says it helps.

nnU-Net's rule, per organ: over the validation cases of all folds pooled together, compare the
organ's mean Dice with and without removing all but its largest connected component; apply the
step to that organ only when the mean Dice is strictly higher after, as nnU-Net v2 does. A tie
(e.g. an organ never predicted in more than one piece) is no evidence for a step that could
remove a true part of an unseen case, so the organ is left alone. Components are 26-connected
(voxels touching by a face, an edge or a corner are one component), as in nnU-Net v2's
`remove_all_but_largest_component`. nnU-Net first tries the same on the union of all organs;
that step is not taken here: every decision is per organ.

`python -m vnet_jax.evaluate --cv=runs/EXP` writes the decision to `runs/EXP/postprocessing.json`;
`python -m vnet_jax.predict` applies it (`find_decision`, `read_decision`,
`keep_largest_component`).

Where the data come from, for each `runs/EXP/fold*/` workdir:
- predictions: `eval/predictions/<case>.nii.gz`, the fold's validation cases in their original
  geometry (other files there, e.g. the report's `.npz`, are skipped);
- references: the dataset training used, `dataset_root` in the workdir's `plan.json` (a
  relative path is relative to the directory training ran from), discovered as in training
  (FLARE22 or nnU-Net v2 layout), its labels mapped by the plan's `label_lut` to the classes the
  network predicts; the classes are the plan's `class_names`.
Dice is `scoring.evaluate_case`'s (FLARE22 rules: an organ absent from both counts 1, the
slice rule for aorta, IVC and esophagus), with the reference header's spacing and axial axis.
"""

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from vnet_jax import evaluate, scoring, summaries
from vnet_jax.data import layouts
from vnet_jax.errors import DataError, one_line
from vnet_jax.files import write_json_atomic

CONNECTIVITY = 26
DECISION_FILE = "postprocessing.json"
PREDICTIONS = Path("eval") / "predictions"  # inside a fold workdir
RULE = (
  "keep only the largest connected component of a class when its mean Dice over the pooled "
  "validation cases of all folds is strictly higher after than before"
)


def keep_largest_component(labels: np.ndarray, class_ids: Iterable[int]) -> np.ndarray:
  """A copy of `labels` where each listed class keeps only its largest connected component.

  Removed voxels become background (0); other classes are untouched; `labels` is not modified.
  Components are 26-connected in 3D (full connectivity in any dimension); when several
  components share the largest size, all of them stay (as in nnU-Net).
  """
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must hold integer class ids, got {labels.dtype}")
  ids = sorted({int(c) for c in class_ids})
  if any(c <= 0 for c in ids):
    raise ValueError(f"class ids must be foreground (> 0), got {ids}")
  out = labels.copy()
  if not ids or not labels.size:
    return out
  structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
  # One pass finds every class's bounding box; labelling crops is ~10x faster than whole CTs.
  boxes = ndimage.find_objects(labels, max_label=ids[-1])
  for c in ids:
    box = boxes[c - 1]
    if box is None:
      continue
    mask = labels[box] == c
    components, n = ndimage.label(mask, structure=structure)
    if n < 2:
      continue
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    out[box][mask & (sizes[components] < sizes.max())] = 0
  return out


# ---------------------------------------------------------------------------- deciding


def _read_plan(path: Path) -> tuple[dict[int, str], np.ndarray, Path]:
  """(foreground {id: name}, label lookup table, dataset root) of a workdir's plan.json."""
  try:
    plan = json.loads(path.read_text(encoding="utf-8"))
    names = {int(k): str(v) for k, v in plan["class_names"].items() if int(k) > 0}
    lut = np.asarray(plan["label_lut"], np.int64)
    root = Path(plan["dataset_root"])
  except FileNotFoundError:
    raise DataError(f"{path}: does not exist (training writes it when it starts)") from None
  except KeyError as e:
    raise DataError(f"{path}: not a training plan (no {e} entry)") from None
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise DataError(f"{path}: unreadable plan ({one_line(e)})") from None
  if not names or lut.ndim != 1:
    raise DataError(f"{path}: no foreground classes or a malformed label_lut")
  if not root.is_dir():
    raise DataError(
      f"{path}: dataset_root {root} does not exist (a relative path is relative to the "
      f"directory training ran from)"
    )
  return names, lut, root


def _case_dice(pred, ref, spacing, axis, class_ids) -> dict[int, float]:
  scores = scoring.evaluate_case(pred, ref, spacing, class_ids, {}, slice_axis=axis, surface=False)
  return {c: s["dice"] for c, s in scores.items()}


def decide(exp_dir: str | Path) -> dict:
  """Decides, per class, whether keeping its largest component raises its pooled mean Dice.

  Reads every exp_dir/fold*/ workdir's validation predictions and the references they were
  trained on (see the module docstring); a case predicted by two folds is an error.
  Returns {"method", "connectivity", "rule", "folds": [names], "num_cases",
  "classes": {"<id>": {"name", "dice_before", "dice_after", "applied"}}}: the means over all
  pooled cases before and after, in float64.
  """
  folds = summaries.fold_dirs(exp_dir)
  names: dict[int, str] | None = None
  before: dict[int, list[float]] = {}
  after: dict[int, list[float]] = {}
  seen: dict[str, Path] = {}
  references: dict[Path, dict[str, Path]] = {}
  for fold in folds:
    plan_names, lut, root = _read_plan(fold / "plan.json")
    if names is None:
      names = plan_names
      before = {c: [] for c in names}
      after = {c: [] for c in names}
    elif plan_names != names:
      raise DataError(
        f"{fold / 'plan.json'}: classes {plan_names} differ from {folds[0].name}'s {names}"
      )
    if root not in references:
      references[root] = {
        c.case_id: c.label_file for c in layouts.discover_dataset(root).cases if c.label_file
      }
    ids = sorted(names)
    for cid, path in evaluate.list_cases(fold / PREDICTIONS, "prediction").items():
      if cid in seen:
        raise DataError(f"{path}: case {cid!r} is also a validation case of {seen[cid]}")
      seen[cid] = path
      if cid not in references[root]:
        raise DataError(f"{path}: no reference label for case {cid!r} in {root}")
      ref_path = references[root][cid]
      pred, ref, spacing, axis = evaluate.load_pair(path, ref_path)
      if ref.max() >= len(lut):
        raise DataError(f"{ref_path}: label {ref.max()} is not in {fold / 'plan.json'}'s label_lut")
      ref = lut.astype(np.uint8)[ref]  # the classes the network predicts
      dice = _case_dice(pred, ref, spacing, axis, ids)
      kept = keep_largest_component(pred, ids)
      # Only a class that lost voxels can score differently.
      counts = np.bincount(pred.ravel(), minlength=ids[-1] + 1)
      kept_counts = np.bincount(kept.ravel(), minlength=ids[-1] + 1)
      changed = [c for c in ids if kept_counts[c] != counts[c]]
      dice_kept = {**dice, **_case_dice(kept, ref, spacing, axis, changed)}
      for c in ids:
        before[c].append(dice[c])
        after[c].append(dice_kept[c])
  classes = {}
  for c in sorted(names):
    b = float(np.mean(np.asarray(before[c], np.float64)))
    a = float(np.mean(np.asarray(after[c], np.float64)))
    classes[str(c)] = {"name": names[c], "dice_before": b, "dice_after": a, "applied": a > b}
  return {
    "method": "keep_largest_component",
    "connectivity": CONNECTIVITY,
    "rule": RULE,
    "folds": [f.name for f in folds],
    "num_cases": len(seen),
    "classes": classes,
  }


def format_decision(decision: dict) -> str:
  """The decision as a text table: per class Dice before and after, and whether it is applied."""
  lines = [
    f"postprocessing (largest component, {decision['connectivity']}-connected), "
    f"{decision['num_cases']} validation cases of {len(decision['folds'])} folds:",
    f"{'class':<24}{'before':>8}{'after':>8}  applied",
  ]
  chosen = []
  for s in decision["classes"].values():
    lines.append(
      f"{s['name']:<24}{s['dice_before']:>8.4f}{s['dice_after']:>8.4f}  "
      f"{'yes' if s['applied'] else 'no'}"
    )
    chosen.append(s["dice_after"] if s["applied"] else s["dice_before"])
  mean_before = np.mean([s["dice_before"] for s in decision["classes"].values()])
  lines.append(f"{'mean':<24}{mean_before:>8.4f}{np.mean(chosen):>8.4f}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- the file


def write_decision(decision: dict, exp_dir: str | Path) -> Path:
  """Writes exp_dir/postprocessing.json atomically; returns its path."""
  path = Path(exp_dir) / DECISION_FILE
  write_json_atomic(path, decision)
  return path


def read_decision(path: str | Path) -> list[int]:
  """The class ids to postprocess (sorted) from a postprocessing.json; DataError if malformed."""
  path = Path(path)
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise DataError(f"{path}: postprocessing decision does not exist") from None
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable postprocessing decision ({one_line(e)})") from None
  if not isinstance(raw, dict) or not isinstance(raw.get("classes"), dict):
    raise DataError(f"{path}: malformed postprocessing decision (no 'classes' object)")
  if raw.get("connectivity") != CONNECTIVITY:
    raise DataError(
      f"{path}: decision made with connectivity {raw.get('connectivity')!r}, this version "
      f"uses {CONNECTIVITY}: decide again with python -m vnet_jax.evaluate --cv"
    )
  ids = []
  for key, entry in raw["classes"].items():
    if not key.isdigit() or int(key) <= 0:
      raise DataError(f"{path}: malformed postprocessing decision (class id {key!r})")
    applied = entry.get("applied") if isinstance(entry, dict) else None
    if not isinstance(applied, bool):
      raise DataError(
        f"{path}: malformed postprocessing decision (class {key}: 'applied' must be true or false)"
      )
    if applied:
      ids.append(int(key))
  return sorted(ids)


def find_decision(workdirs: Sequence[Path]) -> Path | None:
  """The postprocessing.json that applies to these trained workdirs, or None.

  For each workdir: WORKDIR/postprocessing.json, else its parent's (the experiment directory
  of runs/EXP/foldK). All workdirs must lead to the same file (e.g. the folds of one
  experiment); DataError when they lead to different files or only some lead to one.
  """
  found: dict[Path, Path | None] = {}
  for w in workdirs:
    w = Path(w)
    candidates = (w / DECISION_FILE, w.parent / DECISION_FILE)
    found[w] = next((p for p in candidates if p.is_file()), None)
  distinct = {p.resolve() for p in found.values() if p is not None}
  if not distinct:
    return None
  if len(distinct) > 1 or None in found.values():
    listed = ", ".join(f"{w}: {p or 'none'}" for w, p in found.items())
    raise DataError(f"the workdirs' postprocessing decisions differ ({listed})")
  return next(iter(found.values()))


def decision_of(workdirs: Sequence[str | Path]) -> tuple[list[int], Path] | None:
  """(class ids to postprocess, decision file) of the workdirs' experiment; None without one."""
  path = find_decision(workdirs)
  return None if path is None else (read_decision(path), path)
