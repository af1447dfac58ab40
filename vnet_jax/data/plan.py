"""What preprocessing does to a dataset: settings, the plan (plan.json) and CT statistics.

`PreprocessSettings` is what the user chooses; `base_plan` turns it and the dataset's headers
into the plan: target spacing (the median spacing unless given), per-channel normalisation
scheme, class names after `label_map`. A plan holds everything needed to preprocess a new case
the same way (`preprocess.preprocess_image`), so it is stored with the model. `cache_hash`
names the cache directory of a (dataset files, settings) pair.

Normalisation schemes per channel: 'zscore' uses each case's own mean/std over its body mask;
'ct' clips to a window (the dataset's 0.5/99.5 percentiles of foreground intensities unless
given) and z-scores with the dataset's foreground mean/std after clipping (`compute_ct_stats`
fills them in from samples the cache's first pass stores); 'none' only casts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vnet_jax.data.layouts import Dataset
from vnet_jax.data.validation import CaseHeader
from vnet_jax.errors import DataError

CACHE_VERSION = 1  # of plan.json and the cache layout
CT_BODY_THRESHOLD_HU = -500.0  # above air and lung parenchyma, below all soft tissue
CT_PERCENTILES = (0.5, 99.5)
FG_SAMPLES_TOTAL = 10_000_000  # foreground intensities kept per CT channel, whole dataset
FG_SAMPLES_MIN_PER_CASE = 10_000
NORMALIZATIONS = ("ct", "zscore", "none")


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
  """How to preprocess. Every field is part of the cache hash.

  target_spacing: (z, y, x) mm, or None for the per-axis median spacing of the dataset.
  normalization: one of 'ct' | 'zscore' | 'none' per channel, or None to choose from the channel
    names ('CT' -> 'ct', 'noNorm'/'none' -> 'none', anything else -> 'zscore').
  ct_window: (lo, hi) HU clip for 'ct' channels, or None for the dataset's 0.5/99.5 percentiles
    of foreground (label > 0) intensities.
  crop_to_nonzero: crop every case to the bounding box of its body/nonzero region and labels.
  image_dtype: dtype of the cached image.npy ('float32' | 'float16').
  label_map: (original, new) pairs; original labels not listed become 0.
  """

  target_spacing: tuple[float, float, float] | None = None
  normalization: tuple[str, ...] | None = None
  ct_window: tuple[float, float] | None = None
  crop_to_nonzero: bool = True
  image_dtype: str = "float32"
  label_map: tuple[tuple[int, int], ...] | None = None

  def __post_init__(self):
    # Accept lists (e.g. from a config) but store tuples so settings hash and compare stably.
    if self.target_spacing is not None:
      ts = tuple(float(s) for s in self.target_spacing)
      if len(ts) != 3 or not all(np.isfinite(s) and s > 0 for s in ts):
        raise ValueError(f"target_spacing must be 3 positive numbers (z, y, x), got {ts}")
      object.__setattr__(self, "target_spacing", ts)
    if self.normalization is not None:
      norm = self.normalization
      norm = tuple(str(n).lower() for n in ((norm,) if isinstance(norm, str) else norm))
      bad = [n for n in norm if n not in NORMALIZATIONS]
      if bad or not norm:
        raise ValueError(f"normalization must be a tuple of {NORMALIZATIONS}, got {norm}")
      object.__setattr__(self, "normalization", norm)
    if self.ct_window is not None:
      win = tuple(float(v) for v in self.ct_window)
      if len(win) != 2 or not win[0] < win[1]:
        raise ValueError(f"ct_window must be (lo, hi) with lo < hi, got {win}")
      object.__setattr__(self, "ct_window", win)
    if self.image_dtype not in ("float32", "float16"):
      raise ValueError(f"image_dtype must be 'float32' or 'float16', got {self.image_dtype!r}")
    object.__setattr__(self, "crop_to_nonzero", bool(self.crop_to_nonzero))
    if self.label_map is not None:
      lm = tuple(
        (int(a), int(b))
        for a, b in (self.label_map.items() if isinstance(self.label_map, dict) else self.label_map)
      )
      if any(not 0 <= v <= 255 for pair in lm for v in pair):
        raise ValueError(f"label_map ids must be in 0..255, got {lm}")
      if len({a for a, _ in lm}) != len(lm):
        raise ValueError(f"label_map maps an original label twice: {lm}")
      object.__setattr__(self, "label_map", tuple(sorted(lm)))

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    return {
      k: (
        list(map(list, v))
        if k == "label_map" and v is not None
        else list(v)
        if isinstance(v, tuple)
        else v
      )
      for k, v in d.items()
    }


def default_normalization(channel_name: str) -> str:
  """Scheme for a channel named `channel_name` when the settings give none."""
  name = channel_name.strip().lower()
  if name == "ct":
    return "ct"
  if name in ("nonorm", "none"):
    return "none"
  return "zscore"


def _mapped_classes(dataset: Dataset, settings: PreprocessSettings) -> tuple[dict[int, str], list]:
  if settings.label_map is None:
    lut = list(range(256))
    return dict(dataset.class_names), lut
  lut = [0] * 256
  names: dict[int, list[str]] = {0: ["background"]}
  for orig, new in settings.label_map:
    if orig not in dataset.class_names:
      raise DataError(
        f"{dataset.root}: label_map maps {orig}, which is not a class of the "
        f"dataset {sorted(dataset.class_names)}"
      )
    lut[orig] = new
    if new != 0:
      names.setdefault(new, []).append(dataset.class_names[orig])
  return {k: "+".join(v) for k, v in sorted(names.items())}, lut


def base_plan(
  dataset: Dataset, settings: PreprocessSettings, headers: dict[str, CaseHeader], digest: str
) -> dict:
  """The plan before CT statistics are known (their mean/std are None until computed)."""
  spacings = np.array([headers[c.case_id].spacing_zyx for c in dataset.cases], np.float64)
  median = np.median(spacings, axis=0)
  target = settings.target_spacing or tuple(float(s) for s in median)
  if settings.normalization is not None:
    schemes = settings.normalization
    if len(schemes) != dataset.num_channels:
      raise DataError(
        f"{dataset.root}: normalization has {len(schemes)} entries but the dataset "
        f"has {dataset.num_channels} channel(s) {list(dataset.channel_names)}"
      )
  else:
    schemes = tuple(default_normalization(n) for n in dataset.channel_names)
  norms = []
  for i, (name, scheme) in enumerate(zip(dataset.channel_names, schemes)):
    n: dict[str, Any] = {"channel": i, "name": name, "scheme": scheme}
    if scheme == "ct":
      n.update(
        clip=list(settings.ct_window) if settings.ct_window else None,
        mean=None,
        std=None,
        window_source="settings" if settings.ct_window else "foreground percentiles",
      )
    norms.append(n)
  class_names, lut = _mapped_classes(dataset, settings)
  return {
    "version": CACHE_VERSION,
    "hash": digest,
    "dataset_root": str(dataset.root),
    "layout": dataset.layout,
    "case_ids": list(dataset.case_ids),
    "channel_names": list(dataset.channel_names),
    "num_channels": dataset.num_channels,
    "target_spacing": [float(s) for s in target],
    "median_spacing": median.tolist(),
    "normalization": norms,
    "crop_to_nonzero": settings.crop_to_nonzero,
    "ct_body_threshold": CT_BODY_THRESHOLD_HU,
    "image_dtype": settings.image_dtype,
    "image_interpolation": "linear",
    "label_interpolation": "per-class linear, argmax",
    "original_class_names": {str(k): v for k, v in dataset.class_names.items()},
    "original_class_ids": sorted(dataset.class_names),
    "class_names": {str(k): v for k, v in class_names.items()},
    "num_classes": max(class_names) + 1,
    "label_map": [list(p) for p in settings.label_map] if settings.label_map else None,
    "label_lut": lut,
    "settings": settings.to_json(),
  }


def _file_fingerprint(dataset: Dataset) -> list:
  files = []
  for case in dataset.cases:
    for f in case.image_files + ((case.label_file,) if case.label_file is not None else ()):
      st = f.stat()
      try:
        name = str(f.relative_to(dataset.root))
      except ValueError:
        name = str(f)
      files.append([name, st.st_size, st.st_mtime_ns])
  return files


def cache_hash(dataset: Dataset, settings: PreprocessSettings) -> str:
  """Hash of the dataset's file list (names, sizes, mtimes), its declared metadata and every
  setting: any change gives a new cache directory, never a stale one."""
  key = {
    "version": CACHE_VERSION,
    "layout": dataset.layout,
    "files": _file_fingerprint(dataset),
    "channel_names": list(dataset.channel_names),
    "class_names": {str(k): v for k, v in sorted(dataset.class_names.items())},
    "settings": settings.to_json(),
    "constants": [
      CT_BODY_THRESHOLD_HU,
      list(CT_PERCENTILES),
      FG_SAMPLES_TOTAL,
      FG_SAMPLES_MIN_PER_CASE,
    ],
  }
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def ct_stats_known(plan: dict) -> bool:
  """Whether every 'ct' channel of the plan has its window mean/std."""
  return all(n["scheme"] != "ct" or n.get("mean") is not None for n in plan["normalization"])


def compute_ct_stats(plan: dict, stage_root: Path, case_ids: Sequence[str]) -> dict:
  """A copy of `plan` with the 'ct' statistics, from the `fg_samples_<c>.npy` of each staged case
  (`stage_root/<case_id>/`)."""
  plan = json.loads(json.dumps(plan))
  for n in plan["normalization"]:
    if n["scheme"] != "ct":
      continue
    c = n["channel"]
    parts = [
      np.load(stage_root / cid / f"fg_samples_{c}.npy")
      for cid in case_ids
      if (stage_root / cid / f"fg_samples_{c}.npy").exists()
    ]
    vals = np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)
    if vals.size == 0:
      raise DataError(
        f"{plan['dataset_root']}: no foreground or body voxels to compute the CT "
        f"intensity statistics of channel {c}"
      )
    pct = np.percentile(vals, CT_PERCENTILES)
    n["foreground_percentiles"] = [float(p) for p in pct]
    if n["clip"] is None:
      n["clip"] = [float(p) for p in pct]
    clipped = np.clip(vals, n["clip"][0], n["clip"][1])
    n["mean"] = float(clipped.mean())
    n["std"] = float(max(clipped.std(), 1e-8))
    n["num_samples"] = int(vals.size)
  return plan
