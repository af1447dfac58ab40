r"""Export trained folds as one file for prediction elsewhere: model.zip (JAX) or model.onnx.

  python -m vnet_jax.export --workdir=runs/flare22/fold0,runs/flare22/fold1 --output=model.zip \
      [--checkpoint=best|latest|STEP]
  python -m vnet_jax.export --workdir=runs/flare22 --output=model.zip
  python -m vnet_jax.export --format=onnx --workdir=runs/flare22/fold0 --output=model.onnx

--workdir is read as by `python -m vnet_jax.predict` (`trained_runs.read_folds`): one fold's
workdir, several separated by commas, or an experiment directory (each fold*/ in it with a
checkpoint). The folds must share one plan and model; only each checkpoint's parameters and
BatchNorm statistics are read. The experiment's postprocessing decision (postprocessing.json,
`python -m vnet_jax.evaluate --cv`), when it has one, is recorded in model.json, so that
`python -m vnet_jax.predict --model=... --postprocess=auto` applies it as with the workdirs.

--format=zip (the default): the plan, the class names, the inference settings, every fold's
variables and the network (full-resolution head, inference mode) serialised by `jax.export` for
CPU and CUDA, for any number of windows per call. `exported_model.load_model_zip` reads it
(the layout is described there). The network is the one the run's config describes, convolutions
included: with `model.conv_impl=auto` the CPU program uses the depth-split convolutions and the
CUDA one native 3D convolutions, as training and `predict` would on each.

--format=onnx: one fold's network with its weights (ONNX opset 23, via jax2onnx): float32 input
`image` (N, D, H, W, C), float32 output `logits` (N, D, H, W, K), N free; the plan, class
names, inference settings and postprocessing decision go to model.json beside it
(`exported_model.load_onnx` reads both). Its
3D convolutions are written as 2D convolutions over depth slices (the package's depth-split
form), since jax2onnx 0.17 converts 1D and 2D convolutions only. Needs the onnx extra
(`pip install 'vnet_jax[onnx]'`).

A file is written under a temporary name and renamed when complete.
"""

import json
import logging
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import serialization

from vnet_jax import cli, files, postprocessing
from vnet_jax import model as model_lib
from vnet_jax.errors import ConfigError
from vnet_jax.exported_model import (
  FORMAT_VERSION,
  FORWARD,
  METADATA,
  ONNX_FORMAT,
  ONNX_INPUT,
  ONNX_OUTPUT,
  ZIP_FORMAT,
  ModelInfo,
  onnx_metadata_path,
  require_onnx_extra,
)
from vnet_jax.trained_runs import TrainedFolds, find_workdirs, read_folds

PLATFORMS = ("cpu", "cuda")


def _model_info(folds: TrainedFolds) -> tuple[ModelInfo, Path | None]:
  """What model.json records of the folds, and the experiment's postprocessing decision file
  (`postprocessing.decision_of`; None when it has none)."""
  found = postprocessing.decision_of(folds.workdirs)
  classes, decision = (None, None) if found is None else (tuple(found[0]), found[1])
  return ModelInfo(folds.plan, folds.class_names, folds.settings, classes), decision


def _apply(model: model_lib.VNet) -> Callable:
  return lambda variables, x: model.apply(variables, x, train=False)


def forward_function(model: model_lib.VNet) -> Callable:
  """`forward(variables, x) -> logits` of the inference model, for every export platform."""
  if model.conv_impl == "auto":
    # 'auto' is settled by the default backend while tracing, but an export is traced once for
    # all platforms: choose per platform inside the program, as resolve_conv_impl would there.
    return lambda variables, x: jax.lax.platform_dependent(
      variables,
      x,
      cpu=_apply(model.clone(conv_impl="depth_split")),
      default=_apply(model.clone(conv_impl="native")),
    )
  return _apply(model)


def export_forward(model: model_lib.VNet, window: Sequence[int], variables: dict) -> bytes:
  """The serialised `jax.export` of `forward_function(model)` for PLATFORMS; the number of
  windows per call is symbolic, so any group size runs with one file."""
  (n,) = jax.export.symbolic_shape("n")
  x = jax.ShapeDtypeStruct((n, *window, model.in_channels), jnp.float32)
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  exported = jax.export.export(jax.jit(forward_function(model)), platforms=PLATFORMS)(specs, x)
  return bytes(exported.serialize())


def write_model_zip(
  workdirs: str | Path | Sequence[str | Path], output: str | Path, which: str = "best"
) -> dict:
  """Writes model.zip (layout: `exported_model`) of the folds; returns its model.json."""
  folds = read_folds(workdirs, which)
  info, decision = _model_info(folds)
  forward = export_forward(folds.model, folds.settings.window, folds.fold_variables[0])
  meta = {
    "format": ZIP_FORMAT,
    "version": FORMAT_VERSION,
    **info.metadata(decision),
    "platforms": list(PLATFORMS),
    "jax_version": jax.__version__,
    "folds": [{**p, "variables": f"fold{i}.msgpack"} for i, p in enumerate(folds.provenance())],
  }
  output = Path(output)
  with files.replacing(output) as tmp, zipfile.ZipFile(tmp, "w") as z:
    z.writestr(METADATA, json.dumps(meta, indent=2))
    z.writestr(FORWARD, forward)
    for fold, variables in zip(meta["folds"], folds.fold_variables):
      z.writestr(fold["variables"], serialization.msgpack_serialize(variables))
  return meta


def _onnx_forward(model: model_lib.VNet, variables: dict) -> Callable:
  def forward(x):
    # While converting, jax2onnx 0.17.1 swaps jnp.take for a function that rejects the
    # unique_indices / indices_are_sorted hints the depth-split convolution passes: drop them.
    converting_take = jnp.take
    jnp.take = lambda a, indices, axis=None, mode=None, **hints: converting_take(
      a, indices, axis=axis, mode=mode
    )
    try:
      return model.apply(variables, x, train=False)
    finally:
      jnp.take = converting_take

  return forward


def write_onnx(workdir: str | Path, output: str | Path, which: str = "best") -> dict:
  """Writes one fold's network as ONNX to `output` (*.onnx) and model.json beside it; returns
  the model.json."""
  output = Path(output)
  if output.suffix != ".onnx":
    raise ConfigError(f"--output={output}: an ONNX model's name must end in .onnx")
  jax2onnx = require_onnx_extra("jax2onnx")
  dirs = find_workdirs(workdir)
  if len(dirs) != 1:
    names = ", ".join(map(str, dirs))
    raise ConfigError(f"--format=onnx exports one fold; --workdir gives {len(dirs)}: {names}")
  folds = read_folds(dirs, which)
  info, decision = _model_info(folds)
  # Forward only: XLA's own kernel gradient keeps the traced program free of custom VJPs.
  model = folds.model.clone(conv_impl="depth_split", slicewise_kernel_grad=False)
  proto = jax2onnx.to_onnx(
    _onnx_forward(model, folds.fold_variables[0]),
    inputs=[("N", *folds.settings.window, model.in_channels)],
    input_names=[ONNX_INPUT],
    output_names=[ONNX_OUTPUT],
    model_name="vnet",
  )
  with files.replacing(output) as tmp:
    tmp.write_bytes(proto.SerializeToString())
  meta = {
    "format": ONNX_FORMAT,
    "version": FORMAT_VERSION,
    **info.metadata(decision),
    "onnx": output.name,
    "input": ONNX_INPUT,
    "output": ONNX_OUTPUT,
    "folds": folds.provenance(),
  }
  files.write_json_atomic(onnx_metadata_path(output), meta)
  return meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.format == "zip":
    meta = write_model_zip(f.workdir, f.output, f.checkpoint)
  else:
    # onnx_ir reports every shape value it leaves untyped: noise for a user.
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    meta = write_onnx(f.workdir, f.output, f.checkpoint)
  folds = ", ".join(f"{p['workdir']} step {p['step']}" for p in meta["folds"])
  size_mb = Path(f.output).stat().st_size / 2**20
  print(
    f"{f.output} ({size_mb:.1f} MB): {len(meta['folds'])} fold(s) ({folds}), "
    f"{len(meta['class_names'])} classes, window {'x'.join(map(str, meta['window']))}"
  )


if __name__ == "__main__":
  flags.DEFINE_string(
    "workdir",
    None,
    "A fold's workdir, several separated by commas, or an experiment directory.",
    required=True,
  )
  flags.DEFINE_string("output", None, "The file to write (model.zip or model.onnx).", required=True)
  flags.DEFINE_enum("format", "zip", ["zip", "onnx"], "zip (JAX, every fold) or onnx (one fold).")
  flags.DEFINE_string(
    "checkpoint", "best", "best (validation mean Dice), latest, or a step number."
  )
  cli.run(main, huge_pages=False)  # nothing here runs long enough to gain from huge pages
