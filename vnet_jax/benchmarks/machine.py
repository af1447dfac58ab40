"""What a benchmark ran on (device, CPU model, versions) and what that device can do at best."""

import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info() -> dict:
  """device, platform, num_devices and jax: the JSON keys every JAX benchmark reports."""
  dev = jax.local_devices()[0]
  kind = dev.device_kind
  if dev.platform == "cpu":
    # "cpu" alone says nothing; the model and the cores XLA can use make CPU figures comparable.
    kind = f"{kind}: {_cpu_model()}, {os.cpu_count()} cores"
  return {
    "device": kind,
    "platform": dev.platform,
    "num_devices": jax.local_device_count(),
    "jax": jax.__version__,
  }


def peak_device_memory_mb() -> float | None:
  """Peak device memory of this process so far, where the backend reports it (not on CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return round(stats["peak_bytes_in_use"] / 2**20, 1)


def peak_rss_mb() -> float:
  """Peak resident host memory of this process so far."""
  # ru_maxrss is in KiB on Linux, bytes on macOS.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def matmul_peak_flops(dtype: str, n: int, repeats: int = 5) -> float:
  """FLOP/s of an n x n matrix product in `dtype` (median of `repeats`): the device's practical
  peak."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * n**3 / float(np.median(times))


def flops(compiled) -> float:
  """XLA's FLOP count of a compiled executable (per device for a pmap'd one)."""
  cost = compiled.cost_analysis()
  # A dict in current JAX; older versions give a list with one dict per (identical) program.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float((cost or {}).get("flops", 0.0))
