"""The predict path's speed: preprocess, sliding window and mapping back of one synthetic NIfTI
case of a given shape and spacing, with a random-weight model, and the peak host RSS."""

import concurrent.futures
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from vnet_jax import inference, train
from vnet_jax.benchmarks import machine, synthetic_cache
from vnet_jax.benchmarks.models import ModelSettings
from vnet_jax.data import preprocess
from vnet_jax.model import resolve_conv_impl


def run(
  settings: ModelSettings,
  patch: tuple[int, int, int],
  shape: tuple[int, int, int],
  spacing: tuple[float, float, float],
  target_spacing: tuple[float, float, float],
  tta: bool = False,
  overlap: float = 0.5,
) -> dict:
  """`shape` and `spacing` (x, y, z) of the case; `target_spacing` (z, y, x) of the plan."""
  tmp = Path(tempfile.mkdtemp(prefix="vnet_jax_bench_"))
  try:
    # In a child process, so the phantom and the training-style cache are not part of the
    # predict path's peak RSS; spawned, as a forked child of a process running XLA can hang.
    with concurrent.futures.ProcessPoolExecutor(
      1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
      files, plan, setup_s = pool.submit(
        synthetic_cache.write_one_case, tmp, shape, spacing, target_spacing, settings.seed
      ).result()
    result = _time_predict_path(settings, files, plan, patch, tta, overlap)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {
    "bench": "infer",
    **machine.device_info(),
    "shape": list(shape),
    "spacing": list(spacing),
    "target_spacing": list(target_spacing),
    **result,
    "setup_s": round(setup_s, 2),
  }


def _time_predict_path(
  settings: ModelSettings,
  files: list[str],
  plan: dict,
  patch: tuple[int, int, int],
  tta: bool,
  overlap: float,
) -> dict:
  num_classes, channels = int(plan["num_classes"]), int(plan["num_channels"])
  config, model = settings.build(num_classes, channels, patch)
  # Random weights: the timing does not depend on them.
  state = train.create_train_state(config, model)
  predictor = inference.SlidingWindowPredictor(
    lambda v, x: model.apply(v, x, train=False),
    {"params": state.params, "batch_stats": state.batch_stats},
    window=patch,
    num_classes=num_classes,
    overlap=overlap,
    tta=tta,
  )
  # Warm-up on one window of zeros: compiles the window step (plus one window's run), so the
  # timed pass below is what every later volume of a predict run costs.
  t0 = time.perf_counter()
  predictor.predict_probabilities(np.zeros((*patch, channels), np.float32))
  compile_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  image, meta = preprocess.preprocess_image(files, plan)
  t1 = time.perf_counter()
  probs = predictor.predict_probabilities(image)
  t2 = time.perf_counter()
  labels = preprocess.probabilities_to_original(probs, meta)
  t3 = time.perf_counter()
  padded = tuple(max(s, w) for s, w in zip(image.shape[:3], patch))
  windows = len(inference.window_starts(padded, patch, overlap))
  return {
    "preprocessed_shape": list(image.shape[:3]),
    "original_shape": list(labels.shape),
    "patch": list(patch),
    "filters": list(model.filters),
    "dtype": settings.dtype,
    "conv_impl": resolve_conv_impl(settings.conv_impl),
    "num_classes": num_classes,
    "tta": tta,
    "overlap": overlap,
    "windows": windows,
    "compile_s": round(compile_s, 3),
    "preprocess_s": round(t1 - t0, 3),
    "sliding_window_s": round(t2 - t1, 3),
    "map_back_s": round(t3 - t2, 3),
    "total_s": round(t3 - t0, 3),
    "s_per_window": round((t2 - t1) / windows, 4),
    "peak_rss_mb": machine.peak_rss_mb(),
    "peak_device_memory_mb": machine.peak_device_memory_mb(),
  }
