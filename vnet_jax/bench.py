"""Benchmarks: `python -m vnet_jax.bench <subcommand> [flags]`; the last output line is JSON.

Subcommands:
  loader  Grain training pipeline throughput on a synthetic cache in a temporary directory:
          `python -m vnet_jax.bench loader --patch=128,128,128 --workers=1 --cases=4`.

To add a subcommand, write `def _bench_<name>() -> dict` (reading the flags it needs) and
register it in SUBCOMMANDS; `main` prints the returned dict as the final JSON line.
"""

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS

flags.DEFINE_list("patch", ["128", "128", "128"], "Patch size D,H,W.")
flags.DEFINE_integer("per_device_batch", 2, "Patches per device per step.")
flags.DEFINE_integer("seed", 0, "Random seed.")
# loader
flags.DEFINE_integer("workers", 0, "loader: Grain worker processes (0: in this process).")
flags.DEFINE_integer("read_threads", 1, "loader: with --workers=0, threads building batches "
                     "(NumPy releases the GIL for the heavy parts).")
flags.DEFINE_integer("cases", 4, "loader: synthetic cases in the temporary cache.")
flags.DEFINE_list("volume", ["160", "192", "192"], "loader: synthetic case shape D,H,W.")
flags.DEFINE_integer("batches", 60, "loader: batches to time (after the warm-up ones).")
flags.DEFINE_integer("warmup", 3, "loader: batches taken before timing starts.")
flags.DEFINE_string("cache_dir", None, "loader: existing cache to read instead of a synthetic one "
                    "(all cases under <cache_dir>/cases are used; writes fg_locations.npz there).")


def _ints(values, name: str, n: int = 3) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: expected {n} integers") from None
  if len(out) != n or min(out) < 1:
    raise app.UsageError(f"--{name}={','.join(values)}: expected {n} positive integers")
  return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cell: int = 16) -> np.ndarray:
  """Smooth random float32 field: coarse noise, trilinearly upsampled (separably, in NumPy)."""
  coarse = rng.standard_normal(tuple(s // cell + 2 for s in shape)).astype(np.float32)
  out = coarse
  for axis, s in enumerate(shape):
    pos = np.arange(s, dtype=np.float32) / cell
    i0 = np.floor(pos).astype(np.int64)
    w = (pos - i0).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
  return out.astype(np.float32)


def write_synthetic_cache(root: Path, num_cases: int, shape: tuple[int, int, int],
                          seed: int = 0) -> list[str]:
  """`root/cases/<id>/{image,label}.npy` in the cache format: z-scored image, 2 blob classes."""
  rng = np.random.default_rng(seed)
  ids = []
  for i in range(num_cases):
    cid = f"bench_{i:03d}"
    d = root / "cases" / cid
    d.mkdir(parents=True)
    field = _smooth_field(rng, shape)
    label = np.zeros(shape, np.uint8)
    label[field > 1.0] = 1
    label[field < -1.2] = 2
    image = field + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    image = (image - image.mean()) / image.std()
    np.save(d / "image.npy", image[..., None].astype(np.float32))
    np.save(d / "label.npy", label)
    ids.append(cid)
  return ids


def _bench_loader() -> dict:
  from vnet_jax.data import DataError  # pylint: disable=g-import-not-at-top
  from vnet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vnet_jax.data.augment import AugmentConfig  # pylint: disable=g-import-not-at-top

  patch = _ints(FLAGS.patch, "patch")
  volume = _ints(FLAGS.volume, "volume")
  tmp = None
  t0 = time.perf_counter()
  try:
    if FLAGS.cache_dir:
      cache = Path(FLAGS.cache_dir)
      if not (cache / "cases").is_dir():
        raise DataError(f"{cache / 'cases'}: not a preprocessed cache (no cases directory)")
      case_ids = sorted(p.name for p in (cache / "cases").iterdir() if p.is_dir())
    else:
      tmp = Path(tempfile.mkdtemp(prefix="vnet_jax_bench_"))
      cache = tmp
      case_ids = write_synthetic_cache(cache, FLAGS.cases, volume, FLAGS.seed)
    # One-off per case (then stored in the cache): kept out of the timing.
    pipeline.precompute_foreground_locations(cache, case_ids)
    setup_s = time.perf_counter() - t0
    ds = pipeline.make_train_dataset(
        cache, case_ids, patch_size=patch, per_device_batch=FLAGS.per_device_batch,
        num_local_devices=1, seed=FLAGS.seed, aug=AugmentConfig(),
        num_workers=FLAGS.workers, read_threads=FLAGS.read_threads,
        prefetch_buffer_size=2 * FLAGS.read_threads)
    it = iter(ds)
    try:
      t1 = time.perf_counter()
      for _ in range(FLAGS.warmup):
        next(it)
      warmup_s = time.perf_counter() - t1
      t2 = time.perf_counter()
      for _ in range(FLAGS.batches):
        batch = next(it)
      elapsed = time.perf_counter() - t2
      shapes = {k: list(v.shape) for k, v in batch.items()}
      del batch  # worker batches live in shared memory: release before the workers stop
    finally:
      it.close()
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  patches = FLAGS.batches * FLAGS.per_device_batch
  rate = patches / elapsed
  # "Worker": a worker process, or a reading thread when everything runs in this process.
  loaders = FLAGS.workers if FLAGS.workers > 0 else FLAGS.read_threads
  return {
      "bench": "loader",
      "patches_per_s": round(rate, 2),
      "patches_per_s_per_worker": round(rate / loaders, 2),
      "workers": FLAGS.workers,
      "read_threads": FLAGS.read_threads if FLAGS.workers == 0 else 0,
      "patch": list(patch),
      "per_device_batch": FLAGS.per_device_batch,
      "batches": FLAGS.batches,
      "cases": len(case_ids),
      "volume": None if FLAGS.cache_dir else list(volume),
      "batch_shapes": shapes,
      "setup_s": round(setup_s, 2),
      "warmup_s": round(warmup_s, 2),
      "timed_s": round(elapsed, 2),
  }


SUBCOMMANDS: dict[str, Callable[[], dict]] = {
    "loader": _bench_loader,
}


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: python -m vnet_jax.bench {{{','.join(SUBCOMMANDS)}}} [flags]")
  from vnet_jax.data import DataError  # pylint: disable=g-import-not-at-top
  try:
    result = SUBCOMMANDS[argv[1]]()
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
