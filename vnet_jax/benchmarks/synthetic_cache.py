"""Synthetic FLARE22-like NIfTI cases (`data.synthetic`), preprocessed by the package's own
`prepare_dataset` into its cache, the cache that training reads."""

import time
from collections.abc import Sequence
from pathlib import Path

from vnet_jax.data import cache, layouts, synthetic
from vnet_jax.data.plan import PreprocessSettings


def write(
  root: Path,
  num_cases: int,
  shape: Sequence[int],
  spacing: Sequence[float],
  settings: PreprocessSettings,
  seed: int = 0,
) -> tuple[layouts.Dataset, cache.CachedDataset]:
  """Writes `num_cases` cases of `shape` (x, y, z) voxels at `spacing` (x, y, z) mm under
  root/data and their cache under root/cache."""
  synthetic.write_dataset(str(root / "data"), num_cases, seed=seed, shape=shape, spacing=spacing)
  dataset = layouts.discover_dataset(root / "data")
  return dataset, cache.prepare_dataset(
    dataset, settings, root / "cache", num_workers=0, progress=False
  )


def write_one_case(
  root: Path, shape: Sequence[int], spacing: Sequence[float], target_spacing, seed: int = 0
) -> tuple[list[str], dict, float]:
  """One case and its preprocessing plan: (its image files, the plan, seconds taken)."""
  t0 = time.perf_counter()
  settings = PreprocessSettings(target_spacing=target_spacing)
  dataset, cached = write(root, 1, shape, spacing, settings, seed)
  files = [str(f) for f in dataset.cases[0].image_files]
  return files, cached.plan, time.perf_counter() - t0


def write_volumes(
  root: Path, num_cases: int, volume: Sequence[int], seed: int = 0
) -> cache.CachedDataset:
  """A cache whose every case is exactly `volume` (D, H, W) voxels.

  The phantoms are drawn at half that resolution (1 mm voxels, at least the generator's 32 x 32
  x 8) and the preprocessing resamples them to `volume` with no cropping: drawing is the slow
  part of the setup, and a loader reads the same cache whatever the anatomy's resolution.
  """
  d, h, w = volume
  shape = (max(w // 2, 32), max(h // 2, 32), max(d // 2, 8))  # x, y, z
  # Target spacing (z, y, x) such that round(voxels * 1 mm / target) is the volume exactly.
  target = (shape[2] / d, shape[1] / h, shape[0] / w)
  settings = PreprocessSettings(target_spacing=target, crop_to_nonzero=False)
  return write(root, num_cases, shape, (1.0, 1.0, 1.0), settings, seed)[1]
