"""Benchmarks: `python -m vnet_jax.bench <subcommand> [flags]`; the last output line is JSON.

Subcommands:
  train   Train-step time of the pmap'd step on all local devices with random data: median step
          time, voxels/s, XLA's FLOP count of the compiled step, and the fraction of the device's
          matrix-product peak (measured in the same run) that it achieves:
          `python -m vnet_jax.bench train --patch=32,64,64 --per_device_batch=2 --dtype=float32`.
  infer   Seconds per volume of the whole predict path (preprocess, sliding window, map back) on
          a synthetic NIfTI case of a given shape and spacing, and the peak host RSS:
          `python -m vnet_jax.bench infer --shape=512,512,110 --spacing=0.8,0.8,2.5 --tta`.
  loader  Grain training pipeline throughput on a synthetic cache in a temporary directory:
          `python -m vnet_jax.bench loader --patch=128,128,128 --workers=1 --cases=4`.

--patch defaults per subcommand when not given: loader 128,128,128; train and infer 32,64,64 (with
--filters=8,16,32,32,32), sized to run in well under a minute on a 2-core CPU.

To add a subcommand, write `def _bench_<name>() -> dict` (reading the flags it needs) and
register it in SUBCOMMANDS; `main` prints the returned dict as the final JSON line.
"""

import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_list(
  "patch",
  ["128", "128", "128"],
  "Patch size D,H,W (train and infer: the window); "
  "when not given, loader uses 128,128,128 and train/infer 32,64,64.",
)
flags.DEFINE_integer("per_device_batch", 2, "Patches per device per step.")
flags.DEFINE_integer("seed", 0, "Random seed.")
# train and infer
flags.DEFINE_list(
  "filters",
  ["8", "16", "32", "32", "32"],
  "train/infer: VNet filters per level (the experiments' default is 16,32,64,128,128).",
)
flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16"],
  "train/infer: compute dtype (parameters stay float32).",
)
flags.DEFINE_enum(
  "conv_impl",
  "auto",
  ["auto", "native", "depth_split"],
  "train/infer: 3D convolution formulation ('auto': depth_split on CPU, native elsewhere).",
)
# train
flags.DEFINE_integer("steps", 5, "train: timed steps (after one warm-up step).")
flags.DEFINE_integer("num_classes", 14, "train: classes of the random labels (FLARE22: 14).")
flags.DEFINE_integer(
  "matmul_n",
  0,
  "train: size of the square matrix product that measures the peak "
  "FLOP/s (0: 2048 on CPU, 8192 on accelerators).",
)
flags.DEFINE_string(
  "profile_dir",
  None,
  "train: also write an XLA profile (jax.profiler trace) of 3 steps there, after the timed ones.",
)
# infer
flags.DEFINE_list("shape", ["128", "128", "40"], "infer: synthetic case size x,y,z in voxels.")
flags.DEFINE_list("spacing", ["0.8", "0.8", "2.5"], "infer: synthetic case spacing x,y,z in mm.")
flags.DEFINE_list(
  "target_spacing",
  ["2.5", "1.0", "1.0"],
  "infer: preprocessing target spacing "
  "z,y,x in mm (the plan's; FLARE22's median is about 2.5,0.8,0.8).",
)
flags.DEFINE_bool("tta", False, "infer: mirror test-time augmentation (8 forward passes a window).")
flags.DEFINE_float("overlap", 0.5, "infer: sliding-window overlap.")
# loader
flags.DEFINE_integer("workers", 0, "loader: Grain worker processes (0: in this process).")
flags.DEFINE_integer(
  "read_threads",
  1,
  "loader: with --workers=0, threads building batches "
  "(NumPy releases the GIL for the heavy parts).",
)
flags.DEFINE_integer("cases", 4, "loader: synthetic cases in the temporary cache.")
flags.DEFINE_list("volume", ["160", "192", "192"], "loader: synthetic case shape D,H,W.")
flags.DEFINE_integer("batches", 60, "loader: batches to time (after the warm-up ones).")
flags.DEFINE_integer("warmup", 3, "loader: batches taken before timing starts.")
flags.DEFINE_string(
  "cache_dir",
  None,
  "loader: existing cache to read instead of a synthetic one "
  "(all cases under <cache_dir>/cases are used; writes fg_locations.npz there).",
)


def _ints(values, name: str, n: int = 3) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: expected {n} integers") from None
  if len(out) != n or min(out) < 1:
    raise app.UsageError(f"--{name}={','.join(values)}: expected {n} positive integers")
  return out


def _floats(values, name: str, n: int = 3) -> tuple[float, ...]:
  try:
    out = tuple(float(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: expected {n} numbers") from None
  if len(out) != n or not all(v > 0 for v in out):
    raise app.UsageError(f"--{name}={','.join(values)}: expected {n} positive numbers")
  return out


def _given_or(name: str, default: Sequence[str]) -> list[str]:
  """The flag's value if given on the command line, else this subcommand's default.

  --patch is shared with `loader`, whose 128^3 default would take minutes a step on a CPU.
  """
  return list(FLAGS[name].value) if FLAGS[name].present else list(default)


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _device_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top

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


def _peak_memory_mb() -> float | None:
  """Peak device memory of this process so far, where the backend reports it (not on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top

  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return round(stats["peak_bytes_in_use"] / 2**20, 1)


def _model(num_classes: int, in_channels: int, patch: tuple[int, ...], bn_axis_name: str | None):
  """The VNet and its config as training would build them, with the bench's flags applied."""
  from vnet_jax import model  # pylint: disable=g-import-not-at-top
  from vnet_jax.experiments import base  # pylint: disable=g-import-not-at-top

  config = base.get_config()
  config.seed = FLAGS.seed
  config.patch_size = patch
  config.per_device_batch_size = FLAGS.per_device_batch
  config.compute_dtype = FLAGS.dtype
  config.model.filters = _ints(FLAGS.filters, "filters", max(len(FLAGS.filters), 2))
  config.model.conv_impl = FLAGS.conv_impl
  return config, model.build_model(config, num_classes, in_channels, bn_axis_name=bn_axis_name)


def _flops(cost) -> float:
  """'flops' from a compiled executable's cost analysis: a dict in current JAX; older versions
  return a list holding one dict per (identical, per-device) program."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float((cost or {}).get("flops", 0.0))


def _matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
  """FLOP/s of an n x n matrix product in `dtype` (median of `repeats`): the device's practical
  peak."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

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


def _bench_train() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import jax_utils  # pylint: disable=g-import-not-at-top

  from vnet_jax import train  # pylint: disable=g-import-not-at-top
  from vnet_jax.model import resolve_conv_impl, xla_kernel_gradients  # pylint: disable=g-import-not-at-top

  patch = _ints(_given_or("patch", ["32", "64", "64"]), "patch")
  if FLAGS.steps < 1:
    raise app.UsageError("--steps must be >= 1")
  config, model = _model(FLAGS.num_classes, 1, patch, bn_axis_name=train.AXIS)
  n_dev = jax.local_device_count()
  state = train.create_train_state(config, model)
  p_state = jax_utils.replicate(state)
  rng = np.random.default_rng(FLAGS.seed)
  shape = (n_dev, FLAGS.per_device_batch, *patch)
  # Put on the devices once (by an identity pmap, which gives the step's own input sharding), so
  # the timing is the step's computation and not the host-to-device copy of the batch.
  batch = jax.pmap(lambda b: b)(
    {
      "image": rng.standard_normal((*shape, 1), dtype=np.float32),
      "label": rng.integers(0, FLAGS.num_classes, shape, dtype=np.int32),
    }
  )
  p_step = train.make_p_train_step(config, FLAGS.num_classes)

  t0 = time.perf_counter()
  compiled = p_step.compile(p_state, batch)
  compile_s = time.perf_counter() - t0
  # Per device: a pmap'd executable is the one-device program. XLA's cost analysis counts a
  # loop's body once, so with the depth-split formulation the FLOPs are those of the same step
  # traced without its slice-wise kernel-gradient loops (the same sums; one more compile,
  # outside compile_s, and none for the native convolutions GPUs use).
  counted = compiled
  if resolve_conv_impl(FLAGS.conv_impl) == "depth_split":
    with xla_kernel_gradients():
      counted = train.make_p_train_step(config, FLAGS.num_classes).compile(p_state, batch)
  flops = _flops(counted.cost_analysis())
  mem = compiled.memory_analysis()
  t0 = time.perf_counter()
  p_state, metrics = compiled(p_state, batch)
  jax.block_until_ready((p_state, metrics))
  first_step_s = time.perf_counter() - t0
  times = []
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    p_state, metrics = compiled(p_state, batch)
    jax.block_until_ready((p_state, metrics))
    times.append(time.perf_counter() - t0)
  page_faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / FLAGS.steps
  loss = float(jax.device_get(metrics["loss"])[0])
  peak_mem = _peak_memory_mb()
  step_s = float(np.median(times))

  profile = None
  if FLAGS.profile_dir:
    # After the timing, so tracing overhead cannot touch the figures; a profiler that cannot
    # start (e.g. no CUPTI) is reported in the JSON rather than losing the measurements.
    try:
      Path(FLAGS.profile_dir).mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(FLAGS.profile_dir)
      try:
        for i in range(3):
          with jax.profiler.StepTraceAnnotation("train", step_num=i):
            p_state, metrics = compiled(p_state, batch)
            jax.block_until_ready((p_state, metrics))
      finally:
        jax.profiler.stop_trace()
      profile = str(FLAGS.profile_dir)
    except Exception as e:  # pylint: disable=broad-except
      profile = f"failed: {' '.join(str(e).split())[:200]}"

  info = _device_info()
  n = FLAGS.matmul_n or (2048 if info["platform"] == "cpu" else 8192)
  peak = _matmul_peak(FLAGS.dtype, n)
  achieved = flops / step_s
  voxels = n_dev * FLAGS.per_device_batch * int(np.prod(patch))
  return {
    "bench": "train",
    **info,
    "patch": list(patch),
    "per_device_batch": FLAGS.per_device_batch,
    "dtype": FLAGS.dtype,
    "filters": list(model.filters),
    "num_classes": FLAGS.num_classes,
    "conv_impl": resolve_conv_impl(FLAGS.conv_impl),
    "steps": FLAGS.steps,
    "compile_s": round(compile_s, 3),
    "first_step_s": round(first_step_s, 4),
    "step_s": round(step_s, 4),
    "step_s_min": round(min(times), 4),
    "step_s_max": round(max(times), 4),
    "steps_per_s": round(1 / step_s, 3),
    "voxels_per_s": round(voxels / step_s),
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


def _make_infer_case(
  root: str,
  shape: tuple[int, ...],
  spacing: tuple[float, ...],
  target_spacing: tuple[float, ...],
  seed: int,
) -> tuple[list[str], dict, float]:
  """Writes one synthetic NIfTI case and its preprocessing plan; returns (image files, plan,
  seconds).

  Run in a child process so its memory (the phantom, the training-style cache) is not part of
  the predict path's peak RSS.
  """
  from vnet_jax.data import layouts, preprocess, synthetic  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  data = Path(root) / "data"
  synthetic.write_dataset(str(data), 1, seed=seed, shape=shape, spacing=spacing)
  dataset = layouts.discover_dataset(data)
  cache = preprocess.prepare_dataset(
    dataset,
    preprocess.PreprocessSettings(target_spacing=target_spacing),
    Path(root) / "cache",
    num_workers=0,
    progress=False,
  )
  files = [str(f) for f in dataset.cases[0].image_files]
  return files, cache.plan, time.perf_counter() - t0


def _bench_infer() -> dict:
  patch = _ints(_given_or("patch", ["32", "64", "64"]), "patch")
  shape = _ints(FLAGS.shape, "shape")
  spacing = _floats(FLAGS.spacing, "spacing")
  target_spacing = _floats(FLAGS.target_spacing, "target_spacing")
  tmp = Path(tempfile.mkdtemp(prefix="vnet_jax_bench_"))
  try:
    # Spawned before JAX starts here: a forked child of a process running XLA threads can hang.
    with concurrent.futures.ProcessPoolExecutor(
      1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
      files, plan, setup_s = pool.submit(
        _make_infer_case, str(tmp), shape, spacing, target_spacing, FLAGS.seed
      ).result()
    return _time_predict_path(files, plan, patch, setup_s, shape, spacing, target_spacing)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _time_predict_path(
  files: list[str],
  plan: dict,
  patch: tuple[int, ...],
  setup_s: float,
  shape: tuple[int, ...],
  spacing: tuple[float, ...],
  target_spacing: tuple[float, ...],
) -> dict:
  from vnet_jax import inference, train  # pylint: disable=g-import-not-at-top
  from vnet_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from vnet_jax.model import resolve_conv_impl  # pylint: disable=g-import-not-at-top

  num_classes, channels = int(plan["num_classes"]), int(plan["num_channels"])
  config, model = _model(num_classes, channels, patch, bn_axis_name=None)
  state = train.create_train_state(
    config, model
  )  # random weights: the timing does not depend on them
  predictor = inference.SlidingWindowPredictor(
    lambda v, x: model.apply(v, x, train=False),
    {"params": state.params, "batch_stats": state.batch_stats},
    window=patch,
    num_classes=num_classes,
    overlap=FLAGS.overlap,
    tta=FLAGS.tta,
  )
  # Warm-up on one window of zeros: compiles the window step (plus one window's run), so the timed
  # pass below is what every later volume of a predict run costs.
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
  windows = len(inference.window_starts(padded, patch, FLAGS.overlap))
  # ru_maxrss is in KiB on Linux (bytes on macOS).
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
    2**20 if sys.platform == "darwin" else 2**10
  )
  return {
    "bench": "infer",
    **_device_info(),
    "shape": list(shape),
    "spacing": list(spacing),
    "target_spacing": list(target_spacing),
    "preprocessed_shape": list(image.shape[:3]),
    "original_shape": list(labels.shape),
    "patch": list(patch),
    "filters": list(model.filters),
    "dtype": FLAGS.dtype,
    "conv_impl": resolve_conv_impl(FLAGS.conv_impl),
    "num_classes": num_classes,
    "tta": FLAGS.tta,
    "overlap": FLAGS.overlap,
    "windows": windows,
    "setup_s": round(setup_s, 2),
    "compile_s": round(compile_s, 3),
    "preprocess_s": round(t1 - t0, 3),
    "sliding_window_s": round(t2 - t1, 3),
    "map_back_s": round(t3 - t2, 3),
    "total_s": round(t3 - t0, 3),
    "s_per_window": round((t2 - t1) / windows, 4),
    "peak_rss_mb": round(rss, 1),
    "peak_device_memory_mb": _peak_memory_mb(),
  }


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


def write_synthetic_cache(
  root: Path, num_cases: int, shape: tuple[int, int, int], seed: int = 0
) -> list[str]:
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
  from vnet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vnet_jax.data.augment import AugmentConfig  # pylint: disable=g-import-not-at-top
  from vnet_jax.errors import DataError  # pylint: disable=g-import-not-at-top

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
      cache,
      case_ids,
      patch_size=patch,
      per_device_batch=FLAGS.per_device_batch,
      num_local_devices=1,
      seed=FLAGS.seed,
      aug=AugmentConfig(),
      num_workers=FLAGS.workers,
      read_threads=FLAGS.read_threads,
      prefetch_buffer_size=2 * FLAGS.read_threads,
    )
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
  "train": _bench_train,
  "infer": _bench_infer,
  "loader": _bench_loader,
}


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: python -m vnet_jax.bench {{{','.join(SUBCOMMANDS)}}} [flags]")
  from vnet_jax.errors import DataError  # pylint: disable=g-import-not-at-top

  try:
    result = SUBCOMMANDS[argv[1]]()
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  from vnet_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.exec_with_huge_pages()
  app.run(main)
