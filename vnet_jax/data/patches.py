"""Patch sampling from the preprocessed cache: one case source, crops, foreground oversampling.

`CaseSource` is the Grain source (element i is case i, memory-mapped with `cache.load_case`);
`PatchSampler` turns (global patch index g, case) into one patch, a plain crop of the cached
volume: the generator Grain seeds from (seed, g) alone picks only the crop position and the
foreground voxel (`pipeline` builds the stream of g). Augmentation happens on the devices
(`vnet_jax/augment.py`).

Foreground oversampling: patch g is centred on a voxel of a random foreground class of its case
when floor((g + 1) * f) > floor(g * f), f = foreground_fraction: exactly a fraction f of the
patches (every third one for 1/3), the rest uniformly placed, some of which hit foreground too.
As in nnU-Net the patch is then moved inside the volume when the voxel lies within half a patch
of the border, so the voxel is always in the patch and at its centre elsewhere.

Padding (volumes smaller than a patch, patches reaching outside): image 0, label 0 (background).
The image is already normalised, so 0 is the dataset mean intensity (CT window z-score or
per-case z-score); it is what nnU-Net pads with in training and inference, it needs no
statistics of the whole volume (a per-case minimum would read every page of the memory map),
and sliding-window inference should pad with the same 0.
"""

import collections
import fractions
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from vnet_jax.data.cache import case_dir, load_case
from vnet_jax.errors import DataError

FG_FILE = "fg_locations.npz"
FG_MAX_PER_CLASS = 10_000
_FG_VERSION = 1
_FG_SAMPLE_SEED = 0  # fixed: the stored locations must not depend on who computed them first


def compute_foreground_locations(
  label: np.ndarray, max_per_class: int = FG_MAX_PER_CLASS
) -> dict[int, np.ndarray]:
  """{class id: (n, 3) int32 voxel coordinates}, up to `max_per_class` per class (nnU-Net)."""
  flat = np.asarray(label).reshape(-1)
  idx = np.flatnonzero(flat)
  values = flat[idx]
  rng = np.random.default_rng(_FG_SAMPLE_SEED)
  out = {}
  for c in np.unique(values):
    sel = idx[values == c]
    if len(sel) > max_per_class:
      sel = np.sort(rng.choice(sel, max_per_class, replace=False))
    out[int(c)] = np.stack(np.unravel_index(sel, label.shape), axis=1).astype(np.int32)
  return out


class CaseSource:
  """Grain random-access source: element i is case i, memory-mapped.

  `source[i]` is `{"case_index": i, "case_id": str, "image": memmap (D, H, W, C),
  "label": memmap (D, H, W)}`. Opened maps are kept per process (bounded) so pages already
  mapped are not faulted in again; they are dropped on pickling (workers reopen them).
  Foreground locations are computed on first use, kept in memory and stored next to the case
  as `fg_locations.npz` (written to a temporary name, then renamed) for other workers and runs.
  """

  def __init__(
    self,
    cache_dir: str | Path,
    case_ids: Sequence[str],
    *,
    max_open: int = 64,
    write_foreground_cache: bool = True,
  ):
    self.cache_dir = Path(cache_dir)
    self.case_ids = tuple(case_ids)
    if not self.case_ids:
      raise DataError(f"{self.cache_dir}: no cases given to the pipeline")
    for cid in self.case_ids:
      for name in ("image.npy", "label.npy"):
        if not (case_dir(self.cache_dir, cid) / name).is_file():
          raise DataError(
            f"{case_dir(self.cache_dir, cid) / name}: missing from the preprocessed cache"
          )
    self.max_open = max_open
    self.write_foreground_cache = write_foreground_cache
    self._init_caches()

  def _init_caches(self):
    self._open = collections.OrderedDict()
    self._fg = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    for k in ("_open", "_fg", "_lock"):
      state.pop(k)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_caches()

  def __len__(self) -> int:
    return len(self.case_ids)

  def __repr__(self) -> str:
    return f"CaseSource({str(self.cache_dir)!r}, {len(self.case_ids)} cases)"

  def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    with self._lock:
      if index in self._open:
        self._open.move_to_end(index)
        return self._open[index]
    arrays = load_case(self.cache_dir, self.case_ids[index])
    with self._lock:
      self._open[index] = arrays
      while len(self._open) > self.max_open:
        self._open.popitem(last=False)
    return arrays

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    image, label = self.arrays(index)
    return {"case_index": index, "case_id": self.case_ids[index], "image": image, "label": label}

  def foreground_locations(self, index: int) -> dict[int, np.ndarray]:
    index = int(index)
    locs = self._fg.get(index)
    if locs is None:
      locs = self._load_or_compute_fg(index)
      self._fg[index] = locs
    return locs

  def _load_or_compute_fg(self, index: int) -> dict[int, np.ndarray]:
    label = self.arrays(index)[1]
    path = case_dir(self.cache_dir, self.case_ids[index]) / FG_FILE
    try:
      with np.load(path, allow_pickle=False) as z:
        if int(z["version"]) == _FG_VERSION and tuple(z["shape"]) == label.shape:
          return {int(k[len("class_") :]): z[k] for k in z.files if k.startswith("class_")}
    except (OSError, ValueError, KeyError):
      pass  # missing, partial or from another format: recompute
    locs = compute_foreground_locations(label)
    if self.write_foreground_cache:
      tmp = path.with_name(f".{FG_FILE}.{os.getpid()}.{uuid.uuid4().hex}.npz")
      try:
        np.savez(
          tmp,
          version=_FG_VERSION,
          shape=np.asarray(label.shape),
          **{f"class_{c}": v for c, v in locs.items()},
        )
        os.replace(tmp, path)  # atomic: readers see the old file or the complete new one
      except OSError as e:  # a read-only cache still trains, it just recomputes per worker
        logging.warning("cannot store %s (%s)", path, e)
        tmp.unlink(missing_ok=True)
    return locs


def precompute_foreground_locations(cache_dir: str | Path, case_ids: Sequence[str]) -> None:
  """Writes every case's fg_locations.npz up front (otherwise each worker's first visit does)."""
  source = CaseSource(cache_dir, case_ids)
  for i in range(len(source)):
    source.foreground_locations(i)


def _as_shape(patch_size: Sequence[int]) -> tuple[int, int, int]:
  shape = tuple(int(p) for p in patch_size)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"patch_size must be 3 positive ints (D, H, W), got {patch_size}")
  return shape


def _crop(arr: np.ndarray, start: Sequence[int], shape: Sequence[int], dtype) -> np.ndarray:
  """arr[start:start+shape] over the first 3 axes, zero-padded where it leaves the array.

  Slices the memory map first, so only the patch's pages are read, and copies once.
  """
  src, dst, inside = [], [], True
  for s, n, size in zip(start, shape, arr.shape[:3]):
    lo, hi = max(s, 0), min(s + n, size)
    if lo >= hi:
      return np.zeros(tuple(shape) + arr.shape[3:], dtype)
    src.append(slice(lo, hi))
    dst.append(slice(lo - s, hi - s))
    inside = inside and lo == s and hi == s + n
  if inside:
    return np.array(arr[tuple(src)], dtype=dtype)
  out = np.zeros(tuple(shape) + arr.shape[3:], dtype)
  out[tuple(dst)] = arr[tuple(src)]
  return out


def is_foreground_patch(index: int, foreground_fraction: float) -> bool:
  """Whether global patch `index` is forced onto foreground: exactly that fraction of indices."""
  f = fractions.Fraction(foreground_fraction).limit_denominator(10_000)
  return ((index + 1) * f.numerator) // f.denominator > (index * f.numerator) // f.denominator


class PatchSampler(grain.transforms.RandomMap):
  """(global patch index, CaseSource element) -> {"image": (D, H, W, C) f32, "label": (D, H, W)}.

  The patch is the cached volume cropped (and zero-padded) as it is: no voxel value changes.
  """

  def __init__(
    self,
    source: CaseSource,
    patch_size: Sequence[int],
    foreground_fraction: float = 1 / 3,
  ):
    if not 0.0 <= foreground_fraction <= 1.0:
      raise ValueError(f"foreground_fraction={foreground_fraction} is not in [0, 1]")
    self.source = source
    self.patch = _as_shape(patch_size)
    self.foreground_fraction = foreground_fraction

  def patch_start(
    self, shape: Sequence[int], rng: np.random.Generator, centre: Sequence[int] | None = None
  ) -> np.ndarray:
    """Corner of the patch: uniform, or centred on `centre` and kept inside the volume.

    Along an axis shorter than the patch, the volume lies inside the patch (padded around).
    """
    shape, patch = np.asarray(shape), np.asarray(self.patch)
    lo, hi = np.minimum(0, shape - patch), np.maximum(0, shape - patch)
    if centre is None:
      return rng.integers(lo, hi + 1)
    return np.clip(np.asarray(centre) - patch // 2, lo, hi)

  def random_map(self, element, rng: np.random.Generator) -> dict[str, np.ndarray]:
    index, case = element
    image, label = case["image"], case["label"]
    centre = None
    if is_foreground_patch(index, self.foreground_fraction):
      locs = self.source.foreground_locations(case["case_index"])
      if locs:  # a case without foreground gets a random patch
        voxels = locs[sorted(locs)[rng.integers(len(locs))]]
        centre = voxels[rng.integers(len(voxels))]
    start = self.patch_start(label.shape, rng, centre)
    return {
      "image": _crop(image, start, self.patch, np.float32),
      "label": _crop(label, start, self.patch, label.dtype),
    }
