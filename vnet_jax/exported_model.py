r"""Loading a model exported by `python -m vnet_jax.export`: model.zip (JAX) or model.onnx.

  from vnet_jax.exported_model import load_model_zip, load_onnx
  model = load_model_zip("model.zip")  # every fold, the plan, the inference settings
  logits = model.apply_fn(model.fold_variables[0], windows)  # (N, D, H, W, C) -> (N, ..., K)
  onnx_model = load_onnx("model.onnx")  # reads model.json beside it too
  logits = onnx_model(windows)

  python -m vnet_jax.predict --model=model.zip --input=scans/ --output=pred/  # or model.onnx

model.zip holds:
- `model.json`: `format` ("vnet_jax.model_zip") and `version`, the training run's `plan`
  (plan.json: how to preprocess a scan), `class_names`, the inference settings (`window` =
  the training patch size, `overlap`, `tta`, `windows_per_device`), `postprocessing` (the
  experiment's decision, `{"classes": [ids whose largest component is kept], "decision":
  path of its postprocessing.json}`, or null when it had none), the `platforms` the network
  was lowered for, and per fold the workdir, checkpoint step and variables file;
- `forward.jaxexport`: the network, `forward(variables, x) -> logits`, serialised with
  `jax.export` (StableHLO) for CPU and CUDA, any number N of windows per call; x is float32
  (N, D, H, W, C) with (D, H, W) = window, logits float32 (N, D, H, W, K), before softmax;
- `fold<i>.msgpack`: fold i's `{"params", "batch_stats"}` (flax.serialization msgpack).
Running it needs JAX (a release that reads the serialisation; model.json records `jax_version`,
the one that wrote it) but not this package's model code: `apply_fn` is the deserialised
`jax.export.Exported.call`, usable under `jax.jit`, `jax.pmap` and `jax.lax.scan`.

model.onnx takes float32 `image` (N, D, H, W, C) and gives float32 `logits` (N, D, H, W, K);
`model.json` beside it has `format` "vnet_jax.onnx" and the same plan, class names, inference
settings and postprocessing. The onnx extra (`pip install 'vnet_jax[onnx]'`) provides
onnxruntime; `OnnxModel.probabilities` is a `sliding_window.RunGroup` in NumPy, so predicting
with it imports no JAX (nor does this module, until `load_model_zip` is called).
"""

import dataclasses
import importlib
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from scipy import special

from vnet_jax.errors import ConfigError, DataError, one_line
from vnet_jax.sliding_window import MIRROR_AXES
from vnet_jax.trained_runs import InferenceSettings

ZIP_FORMAT = "vnet_jax.model_zip"
ONNX_FORMAT = "vnet_jax.onnx"
FORMAT_VERSION = 1
METADATA = "model.json"  # inside model.zip; beside model.onnx it is <name>.json
FORWARD = "forward.jaxexport"
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"
# What a damaged or foreign file raises while being read: zipfile (CRC, truncation), JSON,
# msgpack and jax.export's flatbuffer parser (struct.error on garbage).
_UNREADABLE = (
  OSError,
  ValueError,
  TypeError,
  KeyError,
  IndexError,
  struct.error,
  zipfile.BadZipFile,
)


def require_onnx_extra(module: str) -> ModuleType:
  """Imports one of the onnx extra's packages, or says on one line how to install them."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ConfigError(
      f"ONNX export and loading need the onnx extra: pip install 'vnet_jax[onnx]' ({one_line(e)})"
    ) from None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What prediction needs besides the network: how to preprocess, the classes, the window, and
  the experiment's postprocessing decision."""

  plan: dict
  class_names: dict[int, str]  # background 0 included
  settings: InferenceSettings
  # The classes whose largest component `--postprocess=auto` keeps; None: no decision known.
  postprocess_classes: tuple[int, ...] | None

  @classmethod
  def from_metadata(cls, meta: dict) -> "ModelInfo":
    decision = meta.get("postprocessing")  # absent from files exported before it was recorded
    return cls(
      plan=meta["plan"],
      class_names={int(k): str(v) for k, v in meta["class_names"].items()},
      settings=InferenceSettings(
        window=tuple(int(s) for s in meta["window"]),
        overlap=float(meta["overlap"]),
        tta=bool(meta["tta"]),
        windows_per_device=int(meta["windows_per_device"]),
      ),
      postprocess_classes=None if decision is None else tuple(map(int, decision["classes"])),
    )

  def metadata(self, decision_file: str | Path | None) -> dict:
    """The JSON form `from_metadata` reads; `decision_file`: where the decision was made."""
    decision = None
    if self.postprocess_classes is not None:
      decision = {"classes": list(self.postprocess_classes), "decision": str(decision_file)}
    return {
      "plan": self.plan,
      "class_names": {str(k): v for k, v in self.class_names.items()},
      **dataclasses.asdict(self.settings),
      "postprocessing": decision,
    }


def _check_format(meta: Any, path: Path, expected: str) -> dict:
  found = meta.get("format") if isinstance(meta, dict) else None
  if found != expected:
    raise DataError(f"{path}: not a {expected} file (format {found!r})")
  if meta.get("version") != FORMAT_VERSION:
    raise DataError(
      f"{path}: {expected} version {meta.get('version')!r}; this vnet_jax reads {FORMAT_VERSION}"
    )
  return meta


@dataclasses.dataclass(frozen=True)
class ExportedModel(ModelInfo):
  """A model.zip: `apply_fn(variables, x) -> logits`, one variables tree per fold.

  `fold_variables[i]` is fold i's `{"params", "batch_stats"}`; `steps` and `workdirs` say which
  checkpoint of which training run each fold is. `platforms` are those `apply_fn` runs on.
  """

  apply_fn: Callable[[Any, Any], Any]
  fold_variables: list[dict]
  steps: tuple[int, ...]
  workdirs: tuple[str, ...]
  platforms: tuple[str, ...]


def load_model_zip(path: str | Path) -> ExportedModel:
  """Reads a model.zip written by `python -m vnet_jax.export`; DataError if it is not one."""
  # Here, not at the top: the ONNX path, which imports this module too, runs without JAX.
  import jax
  from flax import serialization

  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: missing (not a file)")
  try:
    with zipfile.ZipFile(path) as z:
      meta = _check_format(json.loads(z.read(METADATA)), path, ZIP_FORMAT)
      exported = jax.export.deserialize(bytearray(z.read(FORWARD)))
      folds = [serialization.msgpack_restore(z.read(f["variables"])) for f in meta["folds"]]
    info = ModelInfo.from_metadata(meta)
  except DataError:
    raise
  except _UNREADABLE as e:
    raise DataError(f"{path}: not a readable {ZIP_FORMAT} file ({one_line(e)})") from None
  # Checked here so a mismatch is one line, not a shape error at the first prediction.
  tree = exported.in_tree.children()[0].children()[0]  # ((variables, x), kwargs)
  specs = [(a.shape, a.dtype) for a in exported.in_avals[: tree.num_leaves]]
  for fold, variables in zip(meta["folds"], folds):
    leaves, found = jax.tree_util.tree_flatten(variables)
    if found != tree or [(np.shape(v), np.asarray(v).dtype) for v in leaves] != specs:
      raise DataError(f"{path}: {fold['variables']} does not fit the network in {FORWARD}")
  return ExportedModel(
    **vars(info),
    apply_fn=exported.call,
    fold_variables=folds,
    steps=tuple(int(f["step"]) for f in meta["folds"]),
    workdirs=tuple(str(f["workdir"]) for f in meta["folds"]),
    platforms=tuple(exported.platforms),
  )


@dataclasses.dataclass(frozen=True)
class OnnxModel(ModelInfo):
  """A model.onnx in onnxruntime (CPU): `model(x)` maps float32 (N, D, H, W, C) windows to
  float32 (N, D, H, W, K) logits."""

  engine: Any  # the onnxruntime object that runs the graph

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return self.engine.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]

  def probabilities(self, windows: np.ndarray, tta: bool = False) -> np.ndarray:
    """A `sliding_window.RunGroup`: the windows' softmax probabilities (float32), with `tta`
    averaged over the 8 mirrorings of the spatial axes (one after another: memory stays at
    one group's)."""
    mirrorings = MIRROR_AXES if tta else ((),)
    total = sum(
      np.flip(special.softmax(self(np.flip(windows, axes)), axis=-1), axes) for axes in mirrorings
    )
    return total / len(mirrorings)


def onnx_metadata_path(path: str | Path) -> Path:
  """model.json beside model.onnx."""
  return Path(path).with_suffix(".json")


def load_onnx(path: str | Path) -> OnnxModel:
  """Reads model.onnx and the model.json beside it; DataError if either is not one of ours."""
  ort = require_onnx_extra("onnxruntime")
  path, meta_path = Path(path), onnx_metadata_path(path)
  for p in (path, meta_path):
    if not p.is_file():
      raise DataError(f"{p}: missing (not a file)")
  try:
    meta = _check_format(json.loads(meta_path.read_text()), meta_path, ONNX_FORMAT)
    info = ModelInfo.from_metadata(meta)
  except DataError:
    raise
  except _UNREADABLE as e:
    raise DataError(f"{meta_path}: not a readable {ONNX_FORMAT} file ({one_line(e)})") from None
  errors = ort.capi.onnxruntime_pybind11_state  # onnxruntime's exceptions (not RuntimeErrors)
  load_errors = (errors.Fail, errors.InvalidArgument, errors.InvalidProtobuf, errors.InvalidGraph)
  try:
    engine = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  except (OSError, *load_errors) as e:
    raise DataError(f"{path}: onnxruntime cannot load it ({one_line(e)})") from None
  names = ([i.name for i in engine.get_inputs()], [o.name for o in engine.get_outputs()])
  if names != ([ONNX_INPUT], [ONNX_OUTPUT]):
    raise DataError(f"{path}: inputs/outputs {names}, expected {ONNX_INPUT!r} -> {ONNX_OUTPUT!r}")
  return OnnxModel(**vars(info), engine=engine)
