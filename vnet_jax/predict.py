r"""Segment new scans with one trained fold or an ensemble of folds, written back in each scan's
original geometry.

  python -m vnet_jax.predict --workdir=runs/flare22/fold0 --input=PATH --output=DIR \
      [--checkpoint=best|latest|STEP] [--tta | --notta] [--postprocess=auto|none|largest]
  python -m vnet_jax.predict --workdir=runs/flare22 --input=PATH --output=DIR
  python -m vnet_jax.predict --workdir=runs/flare22/fold0,runs/flare22/fold3 --input=PATH ...

--workdir: one fold's workdir, several separated by commas, or an experiment directory (each
fold*/ in it with a checkpoint, in fold order). The folds must share one plan (PLAN_FIELDS) and
model (CONFIG_FIELDS); their softmax probabilities are averaged on the working grid inside the
compiled window function (`inference.WindowRunner`), so memory does not grow with the folds.

PATH: a NIfTI file, a folder of them (FLARE22 / nnU-Net names: `<case>_XXXX` channels), a DICOM
series folder or a folder tree of series (`data.dicom` names them). Each case is preprocessed as
in training (plan.json), predicted with a Gaussian-weighted sliding window, mapped back (undo
resampling, crop and reorientation), postprocessed, and written as DIR/<case or series
name>.nii.gz, uint8, in the input's geometry (a series: that of its in-memory NIfTI image).

--postprocess: `auto` keeps the largest connected component of the classes the experiment's
postprocessing.json lists (`python -m vnet_jax.evaluate --cv` decides), if it has one; `none`
does nothing; `largest` does it for every foreground class.

The next case is read and preprocessed in a background thread while the current one runs on the
devices. A progress bar on stderr shows cases done, seconds per case and the time left; stdout
gets one line per case. A bad input is reported on one line and skipped (exit status 1 at the
end); a prediction that cannot be written (full disk, unwritable folder) stops the run with one
line naming the file and the reason (exit status 1), leaving no partial file under its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
from absl import app, flags
from tqdm import tqdm

from vnet_jax import checkpoint, cli, inference, postprocessing, sliding_window, summaries
from vnet_jax import model as model_lib
from vnet_jax.data import dicom, layouts, preprocess
from vnet_jax.errors import ConfigError, DataError, one_line

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
POSTPROCESS_MODES = ("auto", "none", "largest")


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


@dataclasses.dataclass(frozen=True)
class InputCase:
  """One scan to predict: its output name and its NIfTI channel files or its DICOM series."""

  name: str
  files: tuple[Path, ...] = ()
  series: dicom.DicomSeries | None = None


@dataclasses.dataclass
class PreparedCase:
  """A case read and preprocessed: the working-grid image, its meta, the header to write with,
  and the seconds of each stage so far."""

  case: InputCase
  image: np.ndarray
  meta: dict
  header: nib.Nifti1Header
  times: dict[str, float]


def discover_inputs(path: str | Path) -> list[InputCase]:
  """The cases under --input: DICOM series when it holds DICOM, else NIfTI (`discover_images`)."""
  p = Path(path).expanduser()
  if p.exists() and dicom.is_dicom_path(p):
    return [InputCase(s.name, series=s) for s in dicom.find_series(p)]
  return [InputCase(c.case_id, c.image_files) for c in layouts.discover_images(p)]


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


class Predictor:
  """A preprocessing plan and a window model (one fold or an ensemble), ready to segment scans.

  Args:
    plan: the plan.json of the run(s): how to preprocess a scan.
    class_names: {class id: name}, background 0 included.
    settings: window, overlap, tta and windows per device.
    run_group: a `sliding_window.RunGroup` giving window probabilities (already averaged over
      folds and TTA; `settings.tta` is then not used). Its `group_size` attribute, when it has
      one, is the windows of every call, else `settings.windows_per_device`.
    apply_fn, fold_variables: instead of run_group, a model `apply_fn(variables, x) -> logits`
      and one set of variables per fold, run on all local devices (`inference.WindowRunner`).
    workdirs, steps: the training runs and checkpoint steps the weights come from (where
      --postprocess=auto looks for the decision).
  `stage_seconds` collects, per stage, the seconds of every case predicted so far.
  """

  def __init__(
    self,
    plan: dict,
    class_names: dict[int, str],
    settings: InferenceSettings,
    run_group: sliding_window.RunGroup | None = None,
    *,
    apply_fn: inference.ApplyFn | None = None,
    fold_variables: Sequence[Any] | None = None,
    workdirs: Sequence[Path] = (),
    steps: Sequence[int] = (),
  ):
    if (run_group is None) == (apply_fn is None or fold_variables is None):
      raise ValueError("give either run_group or apply_fn and fold_variables")
    self.plan, self.settings = plan, settings
    self.class_names = {int(k): v for k, v in class_names.items()}
    num_classes = len(self.class_names)
    if run_group is None:
      run_group = inference.WindowRunner(
        apply_fn, fold_variables, num_classes, settings.tta, settings.windows_per_device
      )
    group_size = getattr(run_group, "group_size", settings.windows_per_device)
    self.window = sliding_window.SlidingWindow(
      run_group, settings.window, num_classes, group_size, settings.overlap
    )
    self.workdirs, self.steps = tuple(Path(w) for w in workdirs), tuple(steps)
    self.stage_seconds: dict[str, list[float]] = {}

  @classmethod
  def from_workdirs(
    cls,
    workdirs: str | Path | Sequence[str | Path],
    which: str | int = "best",
    tta: bool | None = None,
  ) -> Predictor:
    """The ensemble of these training runs' checkpoints `which` (see `find_workdirs`); only
    parameters and BatchNorm statistics are read. `tta` overrides the runs' config."""
    dirs = find_workdirs(workdirs)
    runs = [read_run(w) for w in dirs]
    check_same_setup(dirs, runs)
    config, plan = runs[0]
    config = ml_collections.ConfigDict(config)
    class_names = {int(k): v for k, v in plan["class_names"].items()}
    model = model_lib.build_model(config, len(class_names), plan["num_channels"]).clone(
      deep_supervision=False  # the full-resolution head only
    )
    settings = InferenceSettings.from_config(config, tta)
    x = jax.ShapeDtypeStruct((1, *settings.window, model.in_channels), jnp.float32)
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    loaded = [checkpoint.load_variables(w, which, template) for w in dirs]
    return cls(
      plan,
      class_names,
      settings,
      apply_fn=lambda v, x: model.apply(v, x, train=False),
      fold_variables=[v for _, v in loaded],
      workdirs=dirs,
      steps=[s for s, _ in loaded],
    )

  def _timed(self, times: dict[str, float], stage: str, t0: float) -> float:
    """Records the seconds since t0 as the case's and in `stage_seconds`; returns the time."""
    t = time.perf_counter()
    times[stage] = t - t0
    self.stage_seconds.setdefault(stage, []).append(t - t0)
    return t

  def prepare(self, case: InputCase) -> PreparedCase:
    """Reads and preprocesses a case (thread-safe: predict_path runs it in the background)."""
    t0 = time.perf_counter()
    if case.series is not None:
      image = dicom.read_series(case.series)
      volume, meta = preprocess.preprocess_image([image], self.plan, source=case.series.folder)
      header = image.header
    else:
      volume, meta = preprocess.preprocess_image(case.files, self.plan)
      header = nib.load(case.files[0]).header
    times: dict[str, float] = {}
    self._timed(times, "preprocess", t0)
    return PreparedCase(case, volume, meta, header, times)

  def segment(self, prepared: PreparedCase, postprocess_classes: Sequence[int] = ()) -> np.ndarray:
    """uint8 labels on the case's original voxel grid, postprocessed for the given classes."""
    t0 = time.perf_counter()
    probs = self.window.predict_probabilities(prepared.image)
    t0 = self._timed(prepared.times, "sliding_window", t0)
    labels = preprocess.probabilities_to_original(probs, prepared.meta)
    del probs
    t0 = self._timed(prepared.times, "map_back", t0)
    if postprocess_classes:
      labels = postprocessing.keep_largest_component(labels, postprocess_classes)
      self._timed(prepared.times, "postprocess", t0)
    return labels

  def write(self, prepared: PreparedCase, labels: np.ndarray, path: Path) -> None:
    """Writes under a temporary name, then renames: `path` is complete or absent; DataError
    when the disk or folder refuses it."""
    t0 = time.perf_counter()
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.tmp.nii.gz")
    try:
      preprocess.write_labels_nifti(tmp, labels, prepared.meta, prepared.header)
      tmp.replace(path)
    except OSError as e:
      with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
      raise DataError(
        f"{path}: cannot write the prediction ({e.strerror or one_line(e)})"
      ) from None
    self._timed(prepared.times, "write", t0)

  def describe(self) -> str:
    if not self.workdirs:
      return "given window runner"
    return ", ".join(f"{w} (step {s})" for w, s in zip(self.workdirs, self.steps))


def postprocess_classes(predictor: Predictor, mode: str) -> list[int]:
  """The classes whose largest component is kept under --postprocess=mode (prints the choice)."""
  if mode not in POSTPROCESS_MODES:
    raise ConfigError(f"--postprocess={mode}: expected one of {', '.join(POSTPROCESS_MODES)}")
  if mode == "none":
    return []
  if mode == "largest":
    classes = sorted(c for c in predictor.class_names if c)
    print(f"postprocessing: largest component of every class {classes}", flush=True)
    return classes
  path = postprocessing.find_decision(predictor.workdirs) if predictor.workdirs else None
  if path is None:
    print("postprocessing: none (no postprocessing.json with the workdirs)", flush=True)
    return []
  classes = postprocessing.read_decision(path)
  print(f"postprocessing: largest component of classes {classes}, as {path} decided", flush=True)
  return classes


def predict_path(
  predictor: Predictor,
  input_path: str | Path,
  output_dir: str | Path,
  postprocess: str = "auto",
  progress: bool = True,
) -> list[str]:
  """Predicts every case under input_path into output_dir; returns the one-line errors of the
  cases that failed. A write failure raises DataError and stops the run."""
  cases = discover_inputs(input_path)
  classes = postprocess_classes(predictor, postprocess)
  output_dir = Path(output_dir)
  try:
    output_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"{output_dir}: cannot create the output folder ({e.strerror})") from None
  print(f"{len(cases)} case(s); model: {predictor.describe()}", flush=True)
  errors = []
  bar = tqdm(total=len(cases), unit="case", file=sys.stderr, disable=not progress)
  # One case ahead: the next case is read and preprocessed while this one runs on the devices.
  with ThreadPoolExecutor(1, thread_name_prefix="vnet_jax_prefetch") as pool, bar:
    upcoming = pool.submit(predictor.prepare, cases[0])
    try:
      for i, case in enumerate(cases, 1):
        current = upcoming
        upcoming = pool.submit(predictor.prepare, cases[i]) if i < len(cases) else None
        try:
          prepared = current.result()
          labels = predictor.segment(prepared, classes)
        except DataError as e:
          errors.append(str(e))
          bar.write(f"[{i}/{len(cases)}] error: {e}", file=sys.stderr)
          bar.update()
          continue
        out = output_dir / f"{case.name}.nii.gz"
        predictor.write(prepared, labels, out)
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in prepared.times.items())
        total = sum(prepared.times.values())
        bar.write(f"[{i}/{len(cases)}] {case.name}: {total:.1f}s ({stages}) -> {out}", sys.stdout)
        bar.update()
    finally:
      if upcoming is not None:
        upcoming.cancel()
  return errors


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  predictor = Predictor.from_workdirs(f.workdir, f.checkpoint, f.tta)
  errors = predict_path(predictor, f.input, f.output, f.postprocess)
  if errors:
    sys.exit(f"{len(errors)} case(s) failed")


if __name__ == "__main__":
  flags.DEFINE_string(
    "workdir",
    None,
    "A training run's workdir, several separated by commas, or an experiment directory (its "
    "fold*/ with a checkpoint): their probabilities are averaged.",
    required=True,
  )
  flags.DEFINE_string(
    "input",
    None,
    "A NIfTI file, a folder of them, a DICOM series folder or a folder tree of DICOM series.",
    required=True,
  )
  flags.DEFINE_string("output", None, "Output folder for <case>.nii.gz.", required=True)
  flags.DEFINE_string(
    "checkpoint", "best", "best (validation mean Dice), latest, or a step number."
  )
  flags.DEFINE_bool(
    "tta",
    None,
    "Mirror test-time augmentation over the three axes (8x slower): --tta or --notta; "
    "default: the run's config.inference.tta.",
  )
  flags.DEFINE_enum(
    "postprocess",
    "auto",
    POSTPROCESS_MODES,
    "Keep only the largest connected component: auto (the classes the experiment's "
    "postprocessing.json lists, if any), none, or largest (every foreground class).",
  )
  cli.run(main)
