"""Cross-validation splits in nnU-Net's `splits_final.json` format, and fold selection.

`create_splits` reproduces nnU-Net v2's splits exactly (sklearn `KFold(n_splits, shuffle=True,
random_state=seed)` over the sorted case ids), without depending on sklearn.
Fold `"all"` follows nnU-Net: train on every case and validate on the same (training) cases,
so the validation numbers of that fold measure fit, not generalisation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from vnet_jax.errors import DataError
from vnet_jax.files import write_json_atomic

Splits = list[dict[str, list[str]]]


def parse_fold(fold: int | str, num_folds: int | None, where: str = "") -> int | str:
  """Normalises a fold argument (int, digit string or 'all'); DataError when out of range."""
  prefix = f"{where}: " if where else ""
  if isinstance(fold, str):
    if fold.strip().lower() == "all":
      return "all"
    try:
      fold = int(fold.strip())
    except ValueError:
      raise DataError(f"{prefix}fold {fold!r} is not an integer or 'all'") from None
  if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)):
    raise DataError(f"{prefix}fold {fold!r} is not an integer or 'all'")
  fold = int(fold)
  if num_folds is not None and not 0 <= fold < num_folds:
    raise DataError(
      f"{prefix}fold {fold} out of range; expected 0..{num_folds - 1} or 'all' ({num_folds} folds)"
    )
  return fold


def check_num_folds(num_cases: int, num_folds: int, where: str = "") -> None:
  prefix = f"{where}: " if where else ""
  if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
    raise DataError(f"{prefix}num_folds must be an integer >= 2, got {num_folds!r}")
  if num_cases < num_folds:
    raise DataError(
      f"{prefix}{num_cases} case(s) but {num_folds} folds requested; "
      f"need at least {num_folds} cases"
    )


def create_splits(case_ids: Iterable[str], num_folds: int = 5, seed: int = 12345) -> Splits:
  """Seeded k-fold splits: disjoint validation sets covering every case once.

  Identical to nnU-Net v2 `generate_crossval_split` (KFold with shuffle over sorted ids): fold
  sizes differ by at most one, the first `n % k` folds get the extra case.
  """
  ids = sorted(case_ids)
  if len(set(ids)) != len(ids):
    raise ValueError("case ids are not unique")
  check_num_folds(len(ids), num_folds)
  order = np.arange(len(ids))
  np.random.RandomState(seed).shuffle(order)  # sklearn KFold's shuffle, bit for bit
  sizes = np.full(num_folds, len(ids) // num_folds)
  sizes[: len(ids) % num_folds] += 1
  splits, start = [], 0
  for size in sizes:
    val_idx = set(order[start : start + size].tolist())
    start += size
    splits.append(
      {
        "train": [ids[i] for i in range(len(ids)) if i not in val_idx],
        "val": [ids[i] for i in range(len(ids)) if i in val_idx],
      }
    )
  return splits


def write_splits(path: str | Path, splits: Splits) -> None:
  """Writes splits.json atomically (temporary file in the same folder, then rename)."""
  write_json_atomic(path, splits)


def read_splits(
  path: str | Path, case_ids: Iterable[str] | None = None, num_folds: int | None = None
) -> Splits:
  """Reads and checks a splits.json; problems raise DataError naming the file."""
  path = Path(path)
  try:
    splits = json.loads(path.read_text())
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: invalid JSON ({str(e).splitlines()[0]})") from None
  if not isinstance(splits, list) or not splits:
    raise DataError(f"{path}: expected a non-empty list of {{'train': [...], 'val': [...]}}")
  known = set(case_ids) if case_ids is not None else None
  for i, fold in enumerate(splits):
    if (
      not isinstance(fold, dict)
      or not {"train", "val"} <= set(fold)
      or not all(
        isinstance(fold[k], list) and all(isinstance(x, str) for x in fold[k])
        for k in ("train", "val")
      )
    ):
      raise DataError(f"{path}: fold {i} is not {{'train': [ids], 'val': [ids]}}")
    if not fold["train"]:
      raise DataError(f"{path}: fold {i} has no training cases")
    overlap = sorted(set(fold["train"]) & set(fold["val"]))
    if overlap:
      raise DataError(f"{path}: fold {i} has cases in both train and val: {_short(overlap)}")
    if known is not None:
      unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
      if unknown:
        raise DataError(f"{path}: fold {i} names unknown case ids {_short(unknown)}")
  if num_folds is not None and len(splits) != num_folds:
    raise DataError(f"{path}: holds {len(splits)} folds but num_folds is {num_folds}")
  return [{"train": list(f["train"]), "val": list(f["val"])} for f in splits]


def load_or_create_splits(
  path: str | Path, case_ids: Iterable[str], num_folds: int | None = 5, seed: int = 12345
) -> Splits:
  """An existing file (e.g. user-given) is used as is after checking it; otherwise splits are
  created (num_folds None -> 5) and written atomically."""
  path = Path(path)
  case_ids = list(case_ids)
  if path.exists():
    return read_splits(path, case_ids, num_folds)
  splits = create_splits(case_ids, 5 if num_folds is None else num_folds, seed)
  write_splits(path, splits)
  return splits


def select_fold(
  splits: Splits, fold: int | str, case_ids: Sequence[str] | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(train_ids, val_ids) of a fold. 'all': every case (`case_ids`, or the union of the splits)
  trains, and validation runs on those same cases (nnU-Net's convention)."""
  fold = parse_fold(fold, len(splits))
  if fold == "all":
    if case_ids is None:
      case_ids = {c for f in splits for c in f["train"] + f["val"]}
    ids = tuple(sorted(case_ids))
    return ids, ids
  return tuple(splits[fold]["train"]), tuple(splits[fold]["val"])


def _short(ids: list[str], n: int = 5) -> str:
  return str(ids[:n])[:-1] + (f", ... ({len(ids)} in all)]" if len(ids) > n else "]")
