"""Grain training pipeline over the preprocessed cache, and full volumes for validation.

Reads `<cache_dir>/cases/<case_id>/{image.npy (D, H, W, C) float32|float16, label.npy (D, H, W)
uint8}` memory-mapped, so a patch reads only its own pages.

The training stream is defined over a GLOBAL patch index g = 0, 1, 2, ...:
- cases are shuffled per epoch (`EpochShuffle`), so patch g comes from case
  `perm_epoch[g % num_cases]`, epoch = g // num_cases;
- patch g is sampled and augmented by `random_map`, whose generator is seeded from
  (seed, g) alone;
- global step s holds patches [s * G, (s + 1) * G) with G = process_count * local_devices *
  per_device_batch; process p takes the p-th block of local_devices * per_device_batch of them,
  device-major. So 2 processes x 2 devices see exactly the batches of 1 process x 4 devices,
  split by device, and the output does not depend on the number of worker processes
  (workers each build whole batches and `mp_prefetch` returns them in order).

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

Iterator state is `{"next_batch": n}`: resuming rebuilds the pipeline from batch n, so a state
restores under any `num_workers`. Save it with Orbax exactly like a Grain iterator:
`ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it))` and
`grain.checkpoint.CheckpointRestore(it)` (see `checkpoint_save_args` / `checkpoint_restore_args`).
"""

import collections
import dataclasses
import fractions
import logging
import os
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from vnet_jax.data import augment as augment_lib
from vnet_jax.data.augment import AugmentConfig
from vnet_jax.errors import DataError

FG_FILE = "fg_locations.npz"
FG_MAX_PER_CLASS = 10_000
_FG_VERSION = 1
_FG_SAMPLE_SEED = 0  # fixed: the stored locations must not depend on who computed them first


def _case_dir(cache_dir: Path, case_id: str) -> Path:
  return cache_dir / "cases" / case_id


def load_case(
  cache_dir: str | Path, case_id: str, *, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """(image (D, H, W, C) float32|float16, label (D, H, W)) of a cached case; DataError if bad."""
  d = _case_dir(Path(cache_dir), case_id)
  arrays = []
  for name in ("image.npy", "label.npy"):
    path = d / name
    try:
      arrays.append(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
    except FileNotFoundError:
      raise DataError(f"{path}: missing from the preprocessed cache") from None
    except (ValueError, OSError) as e:
      raise DataError(f"{path}: unreadable ({e})") from None
  image, label = arrays
  if image.ndim != 4 or image.dtype not in (np.float32, np.float16):
    raise DataError(
      f"{d / 'image.npy'}: expected (D, H, W, C) float32|float16, got {image.shape} {image.dtype}"
    )
  if label.shape != image.shape[:3] or not np.issubdtype(label.dtype, np.integer):
    raise DataError(
      f"{d / 'label.npy'}: expected integer {image.shape[:3]}, got {label.shape} {label.dtype}"
    )
  return image, label


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
        if not (_case_dir(self.cache_dir, cid) / name).is_file():
          raise DataError(
            f"{_case_dir(self.cache_dir, cid) / name}: missing from the preprocessed cache"
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
    path = _case_dir(self.cache_dir, self.case_ids[index]) / FG_FILE
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
  """(global patch index, CaseSource element) -> {"image": (D, H, W, C) f32, "label": (D, H, W)}."""

  def __init__(
    self,
    source: CaseSource,
    patch_size: Sequence[int],
    aug: AugmentConfig | Mapping[str, Any] | None = None,
    foreground_fraction: float = 1 / 3,
  ):
    if not 0.0 <= foreground_fraction <= 1.0:
      raise ValueError(f"foreground_fraction={foreground_fraction} is not in [0, 1]")
    self.source = source
    self.patch = _as_shape(patch_size)
    self.aug = augment_lib.as_config(aug)
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
    t = augment_lib.sample_spatial(rng, self.aug, self.patch)
    if t is None:
      img = _crop(image, start, self.patch, np.float32)
      lab = _crop(label, start, self.patch, label.dtype)
    else:  # a larger crop around the same centre, so rotation/zoom reads real voxels
      crop_start = start - (np.asarray(t.crop_shape) - self.patch) // 2
      img = _crop(image, crop_start, t.crop_shape, np.float32)
      lab = _crop(label, crop_start, t.crop_shape, label.dtype)
      img, lab = augment_lib.apply_spatial(img, lab, t, self.patch)
    img, lab = augment_lib.augment(img, lab, rng, self.aug, inplace=True, spatial=False)
    return {"image": img, "label": lab}


def _with_index(index: int, element: Any) -> tuple[int, Any]:
  return index, element


@dataclasses.dataclass(frozen=True)
class _DeviceBatcher:
  """Stacks local_devices * per_device_batch patches into (L, B, ...) arrays, one copy each.

  With `shared_memory` (worker processes) the batch is built directly in shared memory, which
  `mp_prefetch` then hands over without copying it again.
  """

  num_local_devices: int
  per_device_batch: int
  shared_memory: bool = False

  def _empty(self, shape, dtype):
    if self.shared_memory:
      return grain.multiprocessing.SharedMemoryArray(shape, dtype)
    return np.empty(shape, dtype)

  def __call__(self, patches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    lead = (self.num_local_devices, self.per_device_batch)
    image = self._empty(lead + patches[0]["image"].shape, np.float32)
    # Labels stay in their stored dtype (uint8) across the worker boundary: a quarter of the
    # bytes to move; `_labels_to_int32` widens them in the consumer (about 0.3 ms per 128^3).
    label = self._empty(lead + patches[0]["label"].shape, patches[0]["label"].dtype)
    flat_image = image.reshape((-1,) + image.shape[2:])
    flat_label = label.reshape((-1,) + label.shape[2:])
    for i, p in enumerate(patches):
      flat_image[i] = p["image"]  # also makes flipped views contiguous
      flat_label[i] = p["label"]
    return {"image": image, "label": label}


class EpochShuffle(grain.MapDataset):
  """Infinite repeat of `parent`, each epoch in its own seeded order.

  Element g is `parent[perm_e[g % n]]`, e = g // n, `perm_e = default_rng([seed, e])
  .permutation(n)`. Replaces Grain's `shuffle().repeat()`, whose `index_shuffle` costs
  5-10 ms per element on a handful of cases (0.5 ms at 50): a tiny fold would spend more
  time shuffling than cropping.
  """

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = int(seed)
    self._n = len(parent)
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"

  def permutation(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      if len(self._perms) > 16:  # workers move forward: old epochs are not needed again
        self._perms.clear()
      perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      self._perms[epoch] = perm
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(int(index), self._n)
    return self._parent[int(self.permutation(epoch)[i])]


def _labels_to_int32(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"image": batch["image"], "label": batch["label"].astype(np.int32)}


def make_patch_dataset(
  cache_dir: str | Path,
  case_ids: Sequence[str],
  *,
  patch_size: Sequence[int],
  seed: int,
  aug: AugmentConfig | Mapping[str, Any] | None = None,
  foreground_fraction: float = 1 / 3,
) -> grain.MapDataset:
  """The infinite global patch stream (element g = patch g), before batching and sharding."""
  source = CaseSource(cache_dir, case_ids)
  sampler = PatchSampler(source, patch_size, aug, foreground_fraction)
  return (
    EpochShuffle(grain.MapDataset.source(source), seed)
    .map_with_index(_with_index)
    .random_map(sampler, seed=seed)
  )


class TrainDataset(grain.IterDataset):
  """Infinite per-process batch stream; its iterator's state is the number of batches taken."""

  def __init__(
    self,
    batches: grain.MapDataset,
    read_options: grain.ReadOptions,
    mp_options: grain.MultiprocessingOptions,
  ):
    super().__init__()
    self.batches = batches
    self.read_options = read_options
    self.mp_options = mp_options

  def __iter__(self) -> "TrainIterator":
    return TrainIterator(self)

  def __str__(self) -> str:
    return f"TrainDataset(workers={self.mp_options.num_workers})"


class TrainIterator(grain.DatasetIterator):
  """Yields the per-process batches; `get_state()` is `{"next_batch": n}`.

  `set_state` restarts the Grain pipeline at batch n (workers included), so a state saved with
  any number of workers restores with any other. Call `close()` when done.
  """

  def __init__(self, ds: TrainDataset):
    super().__init__()
    self._ds = ds
    self._next = 0
    self._inner = None

  def _ensure_inner(self):
    if self._inner is None:
      ds = self._ds.batches
      if self._next:
        ds = ds[self._next :]
      if self._ds.mp_options.num_workers > 0:
        # No reading threads inside a worker: the worker is the parallelism, and a batch that
        # a thread built ahead in shared memory would not be unlinked when the workers stop.
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        ds = ds.mp_prefetch(self._ds.mp_options)
      else:
        ds = ds.to_iter_dataset(self._ds.read_options)
      self._inner = iter(ds.map(_labels_to_int32))
    return self._inner

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = next(self._ensure_inner())
    self._next += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next}

  def set_state(self, state: dict[str, Any]) -> None:
    n = int(state["next_batch"])
    if n != self._next and self._inner is not None:
      self._inner.close()
      self._inner = None
    self._next = n

  def start_prefetch(self) -> None:
    self._assert_not_closed()
    self._ensure_inner().start_prefetch()

  def close(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    super().close()


def make_train_dataset(
  cache_dir: str | Path,
  case_ids: Sequence[str],
  *,
  patch_size: Sequence[int],
  per_device_batch: int,
  num_local_devices: int,
  seed: int,
  aug: AugmentConfig | Mapping[str, Any] | None = None,
  foreground_fraction: float = 1 / 3,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  prefetch_buffer_size: int = 2,
  read_threads: int = 1,
  worker_buffer_size: int = 1,
) -> TrainDataset:
  """Infinite, shuffled, augmented training batches for this process.

  Each element: {"image": float32 (num_local_devices, per_device_batch, D, H, W, C),
  "label": int32 (num_local_devices, per_device_batch, D, H, W)}. Deterministic in `seed`,
  independent of `num_workers`; process p of process_count gets its block of every global
  step (see the module docstring). `aug=None` means the default AugmentConfig; pass
  `AugmentConfig.none()` for none. Buffers are small because an element is a whole batch of
  volumes: with `num_workers=0`, `read_threads` threads of this process build up to
  `prefetch_buffer_size` batches ahead; with workers, each worker builds one batch at a time
  (in shared memory) and keeps up to `worker_buffer_size` finished ones. Worker processes are
  spawned: a script using them needs the `if __name__ == "__main__":` guard (absl's app.run is).
  """
  if per_device_batch < 1 or num_local_devices < 1:
    raise ValueError("per_device_batch and num_local_devices must be >= 1")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if num_workers < 0:
    raise ValueError(f"num_workers={num_workers} must be >= 0")
  patches = make_patch_dataset(
    cache_dir,
    case_ids,
    patch_size=patch_size,
    seed=seed,
    aug=aug,
    foreground_fraction=foreground_fraction,
  )
  local = num_local_devices * per_device_batch
  # drop_remainder: the stream is infinite anyway, and ceil() of sys.maxsize / 1 overflows len().
  batcher = _DeviceBatcher(num_local_devices, per_device_batch, shared_memory=num_workers > 0)
  batches = patches.batch(local, drop_remainder=True, batch_fn=batcher)
  if process_count > 1:
    batches = batches[process_index::process_count]
  return TrainDataset(
    batches,
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size),
    grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=worker_buffer_size
    ),
  )


def checkpoint_save_args(it: grain.DatasetIterator):
  """Orbax args for saving the iterator: put it in `ocp.args.Composite(data_iter=...)`."""
  return grain.checkpoint.CheckpointSave(it)


def checkpoint_restore_args(it: grain.DatasetIterator):
  """Orbax args for restoring into `it` in place (it then resumes at the saved batch)."""
  return grain.checkpoint.CheckpointRestore(it)


def iterate_validation_cases(
  cache_dir: str | Path, case_ids: Sequence[str]
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """Yields (case_id, image float32 (D, H, W, C), label (D, H, W) as stored, uint8), in order.

  Whole volumes read into memory one case at a time, for sliding-window validation.
  """
  for cid in case_ids:
    image, label = load_case(cache_dir, cid)
    yield cid, np.array(image, dtype=np.float32), np.array(label)
