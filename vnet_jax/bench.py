"""Benchmarks: `python -m vnet_jax.bench <subcommand> [flags]`; the last output line is JSON.

Subcommands (the benchmarks themselves are in vnet_jax/benchmarks/):
  train   Train-step time of the pmap'd step on all local devices with random data: median step
          time, voxels/s, XLA's FLOP count of the compiled step, and the fraction of the device's
          matrix-product peak (measured in the same run) that it achieves:
          `python -m vnet_jax.bench train --patch=32,64,64 --per_device_batch=2 --dtype=float32`.
  infer   Seconds per case of the whole predict path (`predict.predict_path`: read and
          preprocess in the background, sliding window, map back, write) on --cases copies of a
          synthetic NIfTI case of a given shape and spacing, each stage's seconds, and the
          process's peak host RSS:
          `python -m vnet_jax.bench infer --shape=512,512,300 --spacing=0.8,0.8,2.5 --tta`.
  loader  Grain training pipeline throughput on a synthetic cache in a temporary directory:
          `python -m vnet_jax.bench loader --patch=128,128,128 --workers=1 --cases=4`.

--patch defaults per subcommand when not given: loader 128,128,128; train and infer 32,64,64 (with
--filters=8,16,32,32,32), sized to run in well under a minute on a 2-core CPU. --cases likewise:
loader 4, infer 2.

To add a subcommand, write a function here that reads its flags and returns the benchmark's
dict, and register it in SUBCOMMANDS; `main` prints the dict as the final JSON line.
"""

import json
from collections.abc import Callable, Sequence

from absl import app, flags

from vnet_jax import cli

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined only when run as a program: importing the module must not add global flags.
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
  flags.DEFINE_enum(
    "augment",
    "on",
    ["on", "off"],
    "train: the experiments' on-device augmentations in the step (on) or none (off).",
  )
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
  flags.DEFINE_bool(
    "tta", False, "infer: mirror test-time augmentation (8 forward passes a window)."
  )
  flags.DEFINE_float("overlap", 0.5, "infer: sliding-window overlap.")
  # loader
  flags.DEFINE_integer("workers", 0, "loader: Grain worker processes (0: in this process).")
  flags.DEFINE_integer(
    "read_threads",
    1,
    "loader: with --workers=0, threads building batches "
    "(NumPy releases the GIL for the heavy parts).",
  )
  flags.DEFINE_integer(
    "cases",
    4,
    "loader: synthetic cases in the temporary cache; infer: copies of the synthetic case "
    "predicted in one run (when not given, loader uses 4 and infer 2).",
  )
  flags.DEFINE_list("volume", ["160", "192", "192"], "loader: synthetic case shape D,H,W.")
  flags.DEFINE_integer("batches", 60, "loader: batches to time (after the warm-up ones).")
  flags.DEFINE_integer("warmup", 3, "loader: batches taken before timing starts.")
  flags.DEFINE_string(
    "cache_dir",
    None,
    "loader: a preprocessed cache (<cache_root>/<hash>, with plan.json) to read instead of a "
    "synthetic one (all its cases; writes their fg_locations.npz there).",
  )


def _ints(values: Sequence[str], name: str, n: int = 3) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: expected {n} integers") from None
  if len(out) != n or min(out) < 1:
    raise app.UsageError(f"--{name}={','.join(values)}: expected {n} positive integers")
  return out


def _floats(values: Sequence[str], name: str, n: int = 3) -> tuple[float, ...]:
  try:
    out = tuple(float(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: expected {n} numbers") from None
  if len(out) != n or not all(v > 0 for v in out):
    raise app.UsageError(f"--{name}={','.join(values)}: expected {n} positive numbers")
  return out


def _patch(default: Sequence[str]) -> tuple[int, ...]:
  """--patch if given on the command line, else this subcommand's default.

  --patch is shared with `loader`, whose 128^3 default would take minutes a step on a CPU.
  """
  return _ints(FLAGS.patch if FLAGS["patch"].present else default, "patch")


def _cases(default: int) -> int:
  """--cases if given on the command line, else this subcommand's default."""
  cases = FLAGS.cases if FLAGS["cases"].present else default
  if cases < 1:
    raise app.UsageError(f"--cases={cases}: expected a positive integer")
  return cases


def _model_settings():
  from vnet_jax.benchmarks.models import ModelSettings

  return ModelSettings(
    filters=_ints(FLAGS.filters, "filters", max(len(FLAGS.filters), 2)),
    dtype=FLAGS.dtype,
    conv_impl=FLAGS.conv_impl,
    seed=FLAGS.seed,
  )


def _train() -> dict:
  from vnet_jax.benchmarks import train_step

  if FLAGS.steps < 1:
    raise app.UsageError("--steps must be >= 1")
  return train_step.run(
    _model_settings(),
    _patch(["32", "64", "64"]),
    FLAGS.per_device_batch,
    num_classes=FLAGS.num_classes,
    steps=FLAGS.steps,
    augment=FLAGS.augment == "on",
    matmul_n=FLAGS.matmul_n,
    profile_dir=FLAGS.profile_dir,
  )


def _infer() -> dict:
  from vnet_jax.benchmarks import predict_path

  return predict_path.run(
    _model_settings(),
    _patch(["32", "64", "64"]),
    shape=_ints(FLAGS.shape, "shape"),
    spacing=_floats(FLAGS.spacing, "spacing"),
    target_spacing=_floats(FLAGS.target_spacing, "target_spacing"),
    tta=FLAGS.tta,
    overlap=FLAGS.overlap,
    cases=_cases(2),
  )


def _loader() -> dict:
  from vnet_jax.benchmarks import loader

  return loader.run(
    _patch(["128", "128", "128"]),
    FLAGS.per_device_batch,
    workers=FLAGS.workers,
    read_threads=FLAGS.read_threads,
    batches=FLAGS.batches,
    warmup=FLAGS.warmup,
    cache_dir=FLAGS.cache_dir,
    cases=_cases(4),
    volume=_ints(FLAGS.volume, "volume"),
    seed=FLAGS.seed,
  )


SUBCOMMANDS: dict[str, Callable[[], dict]] = {"train": _train, "infer": _infer, "loader": _loader}


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: python -m vnet_jax.bench {{{','.join(SUBCOMMANDS)}}} [flags]")
  print(json.dumps(SUBCOMMANDS[argv[1]]()), flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
