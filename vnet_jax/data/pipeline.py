"""Grain training pipeline over the preprocessed cache: shuffled, sharded batches; augmentation
happens on the devices, see vnet_jax/augment.py.

Reads `<cache_dir>/cases/<case_id>/{image.npy (D, H, W, C) float32|float16, label.npy (D, H, W)
uint8}` memory-mapped, so a patch reads only its own pages (`patches`). Validation reads whole
volumes with `CachedDataset.load_case` instead.

The training stream is defined over a GLOBAL patch index g = 0, 1, 2, ...:
- cases are shuffled per epoch (`EpochShuffle`), so patch g comes from case
  `perm_epoch[g % num_cases]`, epoch = g // num_cases;
- patch g is sampled and cropped by `patches.PatchSampler`, whose generator (crop position,
  foreground choice) is seeded from (seed, g) alone; the crop is shipped unchanged;
- global step s holds patches [s * G, (s + 1) * G) with G = process_count * local_devices *
  per_device_batch; process p takes the p-th block of local_devices * per_device_batch of them,
  device-major. So 2 processes x 2 devices see exactly the batches of 1 process x 4 devices,
  split by device, and the output does not depend on the number of worker processes
  (workers each build whole batches and `mp_prefetch` returns them in order).

Iterator state is `{"next_batch": n}`: resuming rebuilds the pipeline from batch n, so a state
restores under any `num_workers`. Orbax saves it like any Grain iterator (`vnet_jax.checkpoint`).
"""

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from vnet_jax.data.patches import CaseSource, PatchSampler


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
      flat_image[i] = p["image"]
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
  foreground_fraction: float = 1 / 3,
) -> grain.MapDataset:
  """The infinite global patch stream (element g = patch g), before batching and sharding."""
  source = CaseSource(cache_dir, case_ids)
  sampler = PatchSampler(source, patch_size, foreground_fraction)
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
  foreground_fraction: float = 1 / 3,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  prefetch_buffer_size: int = 2,
  read_threads: int = 1,
  worker_buffer_size: int = 1,
) -> TrainDataset:
  """Infinite, shuffled training batches for this process (not augmented: the train step
  augments them on the devices, see vnet_jax/augment.py).

  Each element: {"image": float32 (num_local_devices, per_device_batch, D, H, W, C),
  "label": int32 (num_local_devices, per_device_batch, D, H, W)}. Deterministic in `seed`,
  independent of `num_workers`; process p of process_count gets its block of every global
  step (see the module docstring). Buffers are small because an element is a whole
  batch of volumes: with `num_workers=0`, `read_threads` threads of this process build up to
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
