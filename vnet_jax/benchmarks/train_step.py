"""The train step's speed: the pmap'd step of training on all local devices, random data.

Reports the median step time, voxels/s, XLA's FLOP count of the compiled step and the fraction
of the device's matrix-product peak (measured in the same run) that it achieves.
"""

import os
import resource
import time
from pathlib import Path

import jax
import numpy as np
from flax import jax_utils

from vnet_jax import errors, train
from vnet_jax.benchmarks import machine
from vnet_jax.benchmarks.models import ModelSettings
from vnet_jax.experiments import base
from vnet_jax.model import resolve_conv_impl


def _timed_steps(compiled, p_state, batch, steps: int):
  """(state, metrics, seconds of each step, host page faults per step)."""
  times = []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    t0 = time.perf_counter()
    p_state, metrics = compiled(p_state, batch)
    jax.block_until_ready((p_state, metrics))
    times.append(time.perf_counter() - t0)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
  return p_state, metrics, times, faults


def _profile(compiled, p_state, batch, profile_dir: str) -> str:
  """Writes an XLA trace of 3 steps; the directory, or why the profiler could not start."""
  # A profiler that cannot start (e.g. no CUPTI) is reported rather than losing the figures.
  try:
    Path(profile_dir).mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(profile_dir)
    try:
      for i in range(3):
        with jax.profiler.StepTraceAnnotation("train", step_num=i):
          p_state, metrics = compiled(p_state, batch)
          jax.block_until_ready((p_state, metrics))
    finally:
      jax.profiler.stop_trace()
  except Exception as e:  # pylint: disable=broad-except
    return f"failed: {errors.one_line(e)}"
  return profile_dir


def run(
  settings: ModelSettings,
  patch: tuple[int, int, int],
  per_device_batch: int,
  num_classes: int = 14,
  steps: int = 5,
  augment: bool = True,
  matmul_n: int = 0,
  profile_dir: str | None = None,
) -> dict:
  """One warm-up step, then `steps` timed ones; `matmul_n` 0: 2048 on CPU, 8192 elsewhere.

  With `augment`, the step augments its patches as training does (the base experiment's
  settings); without, every augmentation's probability is 0.
  """
  config, model = settings.build(num_classes, 1, patch, per_device_batch, train.AXIS)
  if not augment:
    base.switch_off_augmentation(config)
  n_dev = jax.local_device_count()
  p_state = jax_utils.replicate(train.create_train_state(config, model))
  rng = np.random.default_rng(settings.seed)
  shape = (n_dev, per_device_batch, *patch)
  # Put on the devices once (by an identity pmap, which gives the step's own input sharding), so
  # the timing is the step's computation and not the host-to-device copy of the batch.
  batch = jax.pmap(lambda b: b)(
    {
      "image": rng.standard_normal((*shape, 1), dtype=np.float32),
      "label": rng.integers(0, num_classes, shape, dtype=np.int32),
    }
  )
  p_step = train.make_p_train_step(config, num_classes)
  t0 = time.perf_counter()
  compiled = p_step.compile(p_state, batch)
  compile_s = time.perf_counter() - t0
  # XLA's cost analysis counts a loop's body once, so depth-split FLOPs come from the same step
  # traced without the slice-wise kernel-gradient loops (same sums; a compile outside compile_s).
  conv_impl = resolve_conv_impl(settings.conv_impl)
  counted = compiled
  if conv_impl == "depth_split":
    loopless = model.clone(slicewise_kernel_grad=False)
    counted = p_step.compile(p_state.replace(apply_fn=loopless.apply), batch)
  flops = machine.flops(counted)  # per device: a pmap'd executable is the one-device program
  mem = compiled.memory_analysis()

  t0 = time.perf_counter()
  p_state, metrics = compiled(p_state, batch)
  jax.block_until_ready((p_state, metrics))
  first_step_s = time.perf_counter() - t0
  p_state, metrics, times, page_faults = _timed_steps(compiled, p_state, batch, steps)
  loss = float(jax.device_get(metrics["loss"])[0])
  peak_mem = machine.peak_device_memory_mb()
  step_s = float(np.median(times))
  # After the timing, so tracing overhead cannot touch the figures.
  profile = _profile(compiled, p_state, batch, profile_dir) if profile_dir else None

  info = machine.device_info()
  n = matmul_n or (2048 if info["platform"] == "cpu" else 8192)
  peak = machine.matmul_peak_flops(settings.dtype, n)
  achieved = flops / step_s
  return {
    "bench": "train",
    **info,
    "patch": list(patch),
    "per_device_batch": per_device_batch,
    "dtype": settings.dtype,
    "filters": list(model.filters),
    "num_classes": num_classes,
    "augment": "on" if augment else "off",
    "conv_impl": conv_impl,
    "steps": steps,
    "compile_s": round(compile_s, 3),
    "first_step_s": round(first_step_s, 4),
    "step_s": round(step_s, 4),
    "step_s_min": round(min(times), 4),
    "step_s_max": round(max(times), 4),
    "steps_per_s": round(1 / step_s, 3),
    "voxels_per_s": round(n_dev * per_device_batch * int(np.prod(patch)) / step_s),
    "flops_per_step": flops,  # per device, XLA's count of the optimized step
    "achieved_flops_per_s": round(achieved),
    "peak_flops_per_s": round(peak),  # per device: n x n matrix product, same dtype
    "peak_matmul_n": n,
    "efficiency": round(achieved / peak, 4),
    "peak_device_memory_mb": peak_mem,
    # XLA's plan for the step: scratch beyond arguments and outputs (known on every backend).
    "step_temp_memory_mb": round(mem.temp_size_in_bytes / 2**20, 1) if mem is not None else None,
    # Host page faults per step: high where scratch memory is not on huge pages (runtime.py).
    "page_faults_per_step": round(page_faults),
    "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    "loss": loss,
    "profile_dir": profile,
  }
