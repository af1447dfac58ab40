"""The training pipeline's throughput: patches/s of `data.pipeline`'s Grain batches (sampling
and cropping; augmentation runs on the devices) from a preprocessed cache, by default a synthetic
one."""

import shutil
import tempfile
import time
from pathlib import Path

from vnet_jax.benchmarks import synthetic_cache
from vnet_jax.data import cache, patches, pipeline


def _time_batches(ds, warmup: int, batches: int) -> tuple[float, float, dict]:
  """(seconds of the warm-up batches, seconds of the timed ones, the last batch's shapes)."""
  it = iter(ds)
  try:
    t0 = time.perf_counter()
    for _ in range(warmup):
      next(it)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    timed_s = time.perf_counter() - t0
    shapes = {k: list(v.shape) for k, v in batch.items()}
    del batch  # worker batches live in shared memory: release before the workers stop
  finally:
    it.close()
  return warmup_s, timed_s, shapes


def run(
  patch: tuple[int, int, int],
  per_device_batch: int = 2,
  workers: int = 0,
  read_threads: int = 1,
  batches: int = 60,
  warmup: int = 3,
  cache_dir: str | None = None,
  cases: int = 4,
  volume: tuple[int, int, int] = (160, 192, 192),
  seed: int = 0,
) -> dict:
  """`cache_dir`: a preprocessed cache to read (all its cases) instead of `cases` synthetic
  ones of `volume` (D, H, W) voxels."""
  tmp = None
  t0 = time.perf_counter()
  try:
    if cache_dir:
      cached = cache.open_cache(cache_dir)
    else:
      tmp = Path(tempfile.mkdtemp(prefix="vnet_jax_bench_"))
      cached = synthetic_cache.write_volumes(tmp, cases, volume, seed)
    # One-off per case (then stored in the cache): kept out of the timing.
    patches.precompute_foreground_locations(cached.dir, cached.case_ids)
    setup_s = time.perf_counter() - t0
    ds = pipeline.make_train_dataset(
      cached.dir,
      cached.case_ids,
      patch_size=patch,
      per_device_batch=per_device_batch,
      num_local_devices=1,
      seed=seed,
      num_workers=workers,
      read_threads=read_threads,
      prefetch_buffer_size=2 * read_threads,
    )
    warmup_s, timed_s, shapes = _time_batches(ds, warmup, batches)
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  rate = batches * per_device_batch / timed_s
  # "Worker": a worker process, or a reading thread when everything runs in this process.
  loaders = workers if workers > 0 else read_threads
  return {
    "bench": "loader",
    "patches_per_s": round(rate, 2),
    "patches_per_s_per_worker": round(rate / loaders, 2),
    "workers": workers,
    "read_threads": read_threads if workers == 0 else 0,
    "patch": list(patch),
    "per_device_batch": per_device_batch,
    "batches": batches,
    "cases": len(cached.case_ids),
    "volume": None if cache_dir else list(volume),
    "batch_shapes": shapes,
    "setup_s": round(setup_s, 2),
    "warmup_s": round(warmup_s, 2),
    "timed_s": round(timed_s, 2),
  }
