"""summary.json / summary.csv: writing, the one reader, the text table; the cross-validation table.

A summary is what `scoring.summarize` returns (plus "step" when training writes it):
{"mean_dice", "mean_nsd", "per_class": {name: {dice, nsd, hd95}}, "per_case": [...]}. NaN is
written as `null` in JSON and `nan` in CSV, and read back as NaN.
"""

import csv
import io
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vnet_jax.errors import DataError, one_line
from vnet_jax.files import write_json_atomic, write_text_atomic
from vnet_jax.scoring import METRICS

# ---------------------------------------------------------------------------- one summary


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


def _num(x: Any) -> float:
  # summary.json writes NaN as null; anything else that is not a number means a corrupt file.
  if x is None:
    return math.nan
  if isinstance(x, bool) or not isinstance(x, numbers.Real):
    raise TypeError(f"expected a number or null, got {x!r}")
  return float(x)


def _scores(per_class: Mapping) -> dict[str, dict[str, float]]:
  return {str(name): {m: _num(v.get(m)) for m in METRICS} for name, v in per_class.items()}


def read_summary(path: str | Path) -> dict:
  """A summary.json with numbers as floats (null -> NaN); DataError if it cannot be read."""
  path = Path(path)
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {
      "step": raw.get("step"),
      "mean_dice": _num(raw["mean_dice"]),
      "mean_nsd": _num(raw.get("mean_nsd")),
      "per_class": _scores(raw["per_class"]),
      "per_case": [
        {"case": str(c["case"]), "per_class": _scores(c["per_class"])}
        for c in raw.get("per_case") or []
      ],
    }
  except FileNotFoundError:
    raise DataError(f"{path}: summary file does not exist") from None
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DataError(f"{path}: unreadable summary ({one_line(e)})") from None


def format_table(summary: dict) -> str:
  """Per-class Dice, NSD and HD95, then the means, as a fixed-width text table."""
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


def _mean_std(values: Sequence[float]) -> dict[str, float]:
  # Population std (ddof=0) over folds, NaN skipped.
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  if not v.size:
    return {"mean": math.nan, "std": math.nan}
  return {"mean": float(v.mean()), "std": float(v.std())}


def fold_dirs(exp_dir: str | Path) -> list[Path]:
  """The experiment's fold*/ workdirs in fold order; DataError if there are none."""
  exp_dir = Path(exp_dir)
  if not exp_dir.is_dir():
    raise DataError(f"{exp_dir}: experiment directory does not exist")
  folds = sorted((p for p in exp_dir.glob("fold*") if p.is_dir()), key=_fold_key)
  if not folds:
    raise DataError(f"{exp_dir}: no fold*/ directories")
  return folds


def cross_validation_summary(exp_dir: str | Path) -> dict:
  """Gathers exp_dir/fold*/eval/summary.json into mean and std over folds.

  Returns {"folds": [names], "mean_dice": {mean, std}, "mean_nsd": {mean, std},
  "per_class": {name: {dice|nsd|hd95: {mean, std}}}, "per_fold": [{fold, mean_dice, mean_nsd}]}.
  The overall mean is the mean of the folds' mean_dice, its std the std of those fold means.
  Std is numpy's default (population, ddof=0); metrics a fold does not report are skipped.
  """
  folds = fold_dirs(exp_dir)
  summaries = [read_summary(f / "eval" / "summary.json") for f in folds]
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
