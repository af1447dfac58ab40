"""Reading trained runs for inference: the folds a `--workdir` names, their config.json and
plan.json, the check that the folds of an ensemble share one setup, and their weights.

`read_folds` is the one reader `predict` and `export` share: workdirs -> `TrainedFolds` (the
plan, class names, inference settings, the inference model and each fold's checkpoint). Only it
imports JAX and the model code, when it is called: prediction with an ONNX model imports this
module for `InferenceSettings` and runs without JAX.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vnet_jax import summaries
from vnet_jax.errors import DataError, one_line

if TYPE_CHECKING:
  from vnet_jax.model import VNet

# What must agree between the folds of an ensemble: the plan.json fields that define
# preprocessing and the classes, and the config.json fields that define the network and window.
PLAN_FIELDS = (
  "num_channels",
  "channel_names",
  "target_spacing",
  "normalization",
  "crop_to_nonzero",
  "ct_body_threshold",
  "class_names",
)
CONFIG_FIELDS = ("patch_size", "model", "compute_dtype")


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """How the sliding window runs: a run's `config.patch_size` and `config.inference`."""

  window: tuple[int, int, int]
  overlap: float = 0.5
  tta: bool = False
  windows_per_device: int = 1

  @classmethod
  def from_config(cls, config: Any, tta: bool | None = None) -> InferenceSettings:
    """From a run's config (ConfigDict or dict); `tta` overrides `config.inference.tta`."""
    inf = config["inference"]
    return cls(
      tuple(int(s) for s in config["patch_size"]),
      float(inf["overlap"]),
      bool(inf["tta"] if tta is None else tta),
      int(inf["windows_per_device"]),
    )


def find_workdirs(workdirs: str | Path | Sequence[str | Path]) -> list[Path]:
  """--workdir's folds: a workdir, comma-separated workdirs, or experiment directories (their
  fold*/ with a checkpoint, in fold order)."""
  if isinstance(workdirs, str):
    workdirs = [w for w in workdirs.split(",") if w.strip()]
  elif isinstance(workdirs, Path):
    workdirs = [workdirs]
  found = []
  for w in workdirs:
    p = Path(str(w).strip()).expanduser()
    if (p / "config.json").exists() or not any(p.glob("fold*")):
      found.append(p)  # a fold's workdir (or nothing: reading it says what is missing)
      continue
    folds = [f for f in summaries.fold_dirs(p) if _has_checkpoint(f)]
    if not folds:
      raise DataError(f"{p}: no fold*/ workdir in it has a checkpoint")
    found.extend(folds)
  if not found:
    raise DataError("--workdir: no workdir given")
  return found


def _has_checkpoint(workdir: Path) -> bool:
  ckpt = workdir / "checkpoints"
  return ckpt.is_dir() and any(c.name.isdigit() for c in ckpt.iterdir())


def read_run(workdir: Path) -> tuple[dict, dict]:
  """(config.json, plan.json) of a training run's workdir."""
  try:
    return tuple(json.loads((workdir / f).read_text()) for f in ("config.json", "plan.json"))
  except FileNotFoundError as e:
    raise DataError(f"{e.filename}: missing; is {workdir} the workdir of a training run?") from None
  except (OSError, ValueError) as e:
    raise DataError(f"{workdir}: cannot read config.json / plan.json ({one_line(e)})") from None


def _difference(a: Any, b: Any, path: str) -> str | None:
  """The first field where two JSON values differ, with both values; None when equal."""
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b), key=str):
      if found := _difference(a.get(key), b.get(key), f"{path}.{key}"):
        return found
    return None
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    for i, (x, y) in enumerate(zip(a, b)):
      if found := _difference(x, y, f"{path}[{i}]"):
        return found
    return None
  return None if a == b else f"{path} ({a!r} vs {b!r})"


def check_same_setup(workdirs: Sequence[Path], runs: Sequence[tuple[dict, dict]]) -> None:
  """DataError naming two workdirs and the field when the folds' plans or models differ."""
  (config0, plan0), first = runs[0], workdirs[0]
  for w, (config, plan) in zip(workdirs[1:], runs[1:]):
    for name, a, b, fields in (
      ("plan.json", plan0, plan, PLAN_FIELDS),
      ("config.json", config0, config, CONFIG_FIELDS),
    ):
      for field in fields:
        if found := _difference(a.get(field), b.get(field), field):
          raise DataError(
            f"{first} and {w}: {name} field {found} differs; the folds of an ensemble must "
            "share one plan and model"
          )


@dataclasses.dataclass(frozen=True)
class TrainedFolds:
  """The folds of one experiment, read for inference."""

  workdirs: list[Path]
  plan: dict  # the plan.json the folds share: how to preprocess a scan
  class_names: dict[int, str]  # background 0 included
  settings: InferenceSettings
  model: VNet  # the full-resolution head only, inference as predict runs it
  steps: list[int]  # the checkpoint step of each fold
  fold_variables: list[dict]  # {"params", "batch_stats"} per fold

  def provenance(self) -> list[dict]:
    return [{"workdir": str(w), "step": s} for w, s in zip(self.workdirs, self.steps)]


def read_folds(
  workdirs: str | Path | Sequence[str | Path], which: str | int = "best", tta: bool | None = None
) -> TrainedFolds:
  """The folds `find_workdirs` finds, checkpoint `which` ('best', 'latest' or a step) of each:
  only parameters and BatchNorm statistics are read. `tta` overrides the runs' config."""
  # Here, not at the top: reading weights is the only part of this module that needs JAX.
  import jax
  import jax.numpy as jnp
  import ml_collections

  from vnet_jax import checkpoint
  from vnet_jax.model import build_model

  dirs = find_workdirs(workdirs)
  runs = [read_run(w) for w in dirs]
  check_same_setup(dirs, runs)
  config, plan = ml_collections.ConfigDict(runs[0][0]), runs[0][1]
  class_names = {int(k): v for k, v in plan["class_names"].items()}
  model = build_model(config, len(class_names), plan["num_channels"]).clone(deep_supervision=False)
  settings = InferenceSettings.from_config(config, tta)
  x = jax.ShapeDtypeStruct((1, *settings.window, model.in_channels), jnp.float32)
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  loaded = [checkpoint.load_variables(w, which, template) for w in dirs]
  return TrainedFolds(
    dirs, plan, class_names, settings, model, [s for s, _ in loaded], [v for _, v in loaded]
  )
