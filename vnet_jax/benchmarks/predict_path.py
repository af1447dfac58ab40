"""The predict path's speed: `predict.predict_path` (read and preprocess in the background,
sliding window, mapping back, writing) on copies of one synthetic NIfTI case of a given shape
and spacing, with a random-weight model: seconds per case and per stage, and the peak host
RSS of the process (compile included; the synthetic case is made in a child process)."""

import concurrent.futures
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from vnet_jax import predict, sliding_window, train
from vnet_jax.benchmarks import machine, synthetic_cache
from vnet_jax.benchmarks.models import ModelSettings
from vnet_jax.model import resolve_conv_impl


def run(
  settings: ModelSettings,
  patch: tuple[int, int, int],
  shape: tuple[int, int, int],
  spacing: tuple[float, float, float],
  target_spacing: tuple[float, float, float],
  tta: bool = False,
  overlap: float = 0.5,
  cases: int = 2,
) -> dict:
  """`shape` and `spacing` (x, y, z) of the case; `target_spacing` (z, y, x) of the plan;
  `cases`: how many times the case is predicted in one `predict.predict_path` run."""
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
    result = _time_predict_path(settings, files, plan, patch, tta, overlap, cases, tmp)
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
  cases: int,
  tmp: Path,
) -> dict:
  num_classes, channels = int(plan["num_classes"]), int(plan["num_channels"])
  config, model = settings.build(num_classes, channels, patch)
  # Random weights: the timing does not depend on them.
  state = train.create_train_state(config, model)
  predictor = predict.Predictor(
    plan,
    {int(k): v for k, v in plan["class_names"].items()},
    predict.InferenceSettings(patch, overlap, tta),
    apply_fn=lambda v, x: model.apply(v, x, train=False),
    fold_variables=[{"params": state.params, "batch_stats": state.batch_stats}],
  )
  # Warm-up on one window of zeros: compiles the window step (plus one window's run), so the
  # timed run below is what every later volume of a predict run costs.
  t0 = time.perf_counter()
  predictor.window.predict_probabilities(np.zeros((*patch, channels), np.float32))
  compile_s = time.perf_counter() - t0

  # The same scan `cases` times, so later cases are read while earlier ones are predicted.
  inputs = tmp / "inputs"
  inputs.mkdir()
  for i in range(cases):
    for c, f in enumerate(files):
      (inputs / f"case{i:03d}_{c:04d}.nii.gz").symlink_to(Path(f).absolute())
  # The working-grid shape (the crop depends on the content), before timing.
  probe = predictor.prepare(predict.discover_inputs(inputs)[0])
  meta = probe.meta
  del probe
  predictor.stage_seconds.clear()
  t0 = time.perf_counter()
  errors = predict.predict_path(predictor, inputs, tmp / "predictions", "none", progress=False)
  wall_s = time.perf_counter() - t0
  if errors:
    raise RuntimeError(f"the benchmark's prediction failed: {errors[0]}")
  # Medians over the cases; total_s: one case's stages one after another.
  stage_s = {k: float(np.median(v)) for k, v in predictor.stage_seconds.items()}
  shape = meta["resampled_shape"]
  padded = tuple(max(s, w) for s, w in zip(shape, patch))
  windows = len(sliding_window.window_starts(padded, patch, overlap))
  return {
    "preprocessed_shape": shape,
    "original_shape": meta["original_shape"],
    "patch": list(patch),
    "filters": list(model.filters),
    "dtype": settings.dtype,
    "conv_impl": resolve_conv_impl(settings.conv_impl),
    "num_classes": num_classes,
    "tta": tta,
    "overlap": overlap,
    "windows": windows,
    "cases": cases,
    "compile_s": round(compile_s, 3),
    **{f"{k}_s": round(v, 3) for k, v in stage_s.items()},
    "total_s": round(sum(stage_s.values()), 3),
    "s_per_case": round(wall_s / cases, 3),
    "s_per_window": round(stage_s["sliding_window"] / windows, 4),
    "peak_rss_mb": machine.peak_rss_mb(),
    "peak_device_memory_mb": machine.peak_device_memory_mb(),
  }
