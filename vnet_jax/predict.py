r"""Segment new scans with one trained fold, an ensemble of folds or an exported model, written
back in each scan's original geometry.

  python -m vnet_jax.predict --workdir=runs/flare22/fold0 --input=PATH --output=DIR \
      [--checkpoint=best|latest|STEP] [--tta | --notta] [--postprocess=auto|none|largest]
  python -m vnet_jax.predict --workdir=runs/flare22 --input=PATH --output=DIR
  python -m vnet_jax.predict --workdir=runs/flare22/fold0,runs/flare22/fold3 --input=PATH ...
  python -m vnet_jax.predict --model=model.zip --input=PATH --output=DIR  # or model.onnx

--workdir: one fold's workdir, several separated by commas, or an experiment directory (each
fold*/ in it with a checkpoint, in fold order). The folds must share one plan (PLAN_FIELDS) and
model (CONFIG_FIELDS); their softmax probabilities are averaged on the working grid inside the
compiled window function (`inference.WindowRunner`), so memory does not grow with the folds.

--model, instead of --workdir: a file from `python -m vnet_jax.export`, with the plan, settings
and postprocessing decision. model.zip runs its folds as the workdirs would (the same labels on
the same machine); model.onnx runs in onnxruntime, softmax and TTA in NumPy, without JAX.

PATH: a NIfTI file, a folder of them (FLARE22 / nnU-Net names: `<case>_XXXX` channels), a DICOM
series folder or a folder tree of series (`data.dicom` names them). Each case is preprocessed as
in training (plan.json), predicted with a Gaussian-weighted sliding window, mapped back (undo
resampling, crop and reorientation), postprocessed, and written as DIR/<case or series
name>.nii.gz, uint8, in the input's geometry (a series: that of its in-memory NIfTI image).

--postprocess: `auto` keeps the largest connected component of the classes the experiment's
postprocessing.json lists (`python -m vnet_jax.evaluate --cv` decides), if it has one (a model
file: the decision recorded in it); `none` does nothing; `largest` does it for every foreground
class.

The next case is read and preprocessed in a background thread while the current one runs on the
devices. A progress bar on stderr shows cases done, seconds per case and the time left; stdout
gets one line per case. A bad input is reported on one line and skipped (exit status 1 at the
end); a prediction that cannot be written (full disk, unwritable folder) stops the run with one
line naming the file and the reason (exit status 1), leaving no partial file under its name.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from absl import app, flags
from tqdm import tqdm

from vnet_jax import cli, exported_model, files, postprocessing, sliding_window, trained_runs
from vnet_jax.data import dicom, layouts, preprocess
from vnet_jax.errors import ConfigError, DataError
from vnet_jax.trained_runs import InferenceSettings

if TYPE_CHECKING:
  from vnet_jax.inference import ApplyFn

POSTPROCESS_MODES = ("auto", "none", "largest")


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


class Predictor:
  """A preprocessing plan and a window model (one fold, an ensemble or an exported model), ready
  to segment scans.

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
    decision: instead, --postprocess=auto's classes and why, e.g. `([1, 3], "as recorded in
      model.zip")`.
    source: what the model is, for the log (default: the workdirs and steps).
  `stage_seconds` collects, per stage, the seconds of every case predicted so far.
  """

  def __init__(
    self,
    plan: dict,
    class_names: dict[int, str],
    settings: InferenceSettings,
    run_group: sliding_window.RunGroup | None = None,
    *,
    apply_fn: ApplyFn | None = None,
    fold_variables: Sequence[Any] | None = None,
    workdirs: Sequence[Path] = (),
    steps: Sequence[int] = (),
    decision: tuple[Sequence[int], str] | None = None,
    source: str | None = None,
  ):
    if (run_group is None) == (apply_fn is None or fold_variables is None):
      raise ValueError("give either run_group or apply_fn and fold_variables")
    self.plan, self.settings = plan, settings
    self.class_names = {int(k): v for k, v in class_names.items()}
    num_classes = len(self.class_names)
    if run_group is None:
      from vnet_jax import inference  # JAX, imported only when a JAX model is given

      run_group = inference.WindowRunner(
        apply_fn,
        fold_variables,
        num_classes,
        settings.tta,
        settings.windows_per_device,
        weights=sliding_window.gaussian_importance_map(settings.window),
      )
    group_size = getattr(run_group, "group_size", settings.windows_per_device)
    self.window = sliding_window.SlidingWindow(
      run_group, settings.window, num_classes, group_size, settings.overlap
    )
    self.workdirs, self.steps = tuple(Path(w) for w in workdirs), tuple(steps)
    self.decision = decision
    runs = ", ".join(f"{w} (step {s})" for w, s in zip(self.workdirs, self.steps))
    self.source = source or runs or "given window runner"
    self.stage_seconds: dict[str, list[float]] = {}

  @classmethod
  def from_workdirs(
    cls,
    workdirs: str | Path | Sequence[str | Path],
    which: str | int = "best",
    tta: bool | None = None,
  ) -> Predictor:
    """The ensemble of these training runs' checkpoints `which` (`trained_runs.read_folds`).
    `tta` overrides the runs' config."""
    folds = trained_runs.read_folds(workdirs, which, tta)
    model = folds.model
    return cls(
      folds.plan,
      folds.class_names,
      folds.settings,
      apply_fn=lambda v, x: model.apply(v, x, train=False),
      fold_variables=folds.fold_variables,
      workdirs=folds.workdirs,
      steps=folds.steps,
    )

  @classmethod
  def from_model(cls, path: str | Path, tta: bool | None = None) -> Predictor:
    """A file `python -m vnet_jax.export` wrote: model.onnx (its fold in onnxruntime, no JAX)
    or else model.zip (every fold, in JAX). `tta` overrides the settings recorded in it."""
    path = Path(path)
    onnx = path.suffix == ".onnx"
    model = exported_model.load_onnx(path) if onnx else exported_model.load_model_zip(path)
    settings = model.settings if tta is None else dataclasses.replace(model.settings, tta=tta)
    classes = model.postprocess_classes
    decision = None if classes is None else (list(classes), f"as recorded in {path}")
    if onnx:
      runner = {"run_group": functools.partial(model.probabilities, tta=settings.tta)}
    else:
      runner = {"apply_fn": model.apply_fn, "fold_variables": model.fold_variables}
    plan, names = model.plan, model.class_names
    return cls(plan, names, settings, **runner, decision=decision, source=str(path))

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
    """Writes under a temporary name, then renames: `path` is complete or absent; WriteError
    when the disk or folder refuses it."""
    t0 = time.perf_counter()
    with files.replacing(path, ".nii.gz") as tmp:
      preprocess.write_labels_nifti(tmp, labels, prepared.meta, prepared.header)
    self._timed(prepared.times, "write", t0)


def load_predictor(
  workdir: str | None, model: str | None, which: str | None = None, tta: bool | None = None
) -> Predictor:
  """The Predictor of --workdir (training runs, checkpoint `which`, default best) or --model (a
  file from `python -m vnet_jax.export`): exactly one of the two."""
  if (workdir is None) == (model is None):
    given = "both" if workdir else "neither"
    raise ConfigError(
      f"--workdir / --model: {given} given; give the training runs (--workdir) or an exported "
      "model.zip or model.onnx (--model)"
    )
  if model is None:
    return Predictor.from_workdirs(workdir, which or "best", tta)
  if which is not None:
    raise ConfigError(f"--checkpoint={which}: goes with --workdir; {model} holds its checkpoints")
  return Predictor.from_model(model, tta)


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
  decision = predictor.decision
  if decision is None and predictor.workdirs:
    found = postprocessing.decision_of(predictor.workdirs)
    decision = found and (found[0], f"as {found[1]} decided")
  if decision is None:
    print("postprocessing: none (the model comes with no postprocessing decision)", flush=True)
    return []
  classes, why = list(decision[0]), decision[1]
  print(f"postprocessing: largest component of classes {classes}, {why}", flush=True)
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
  print(f"{len(cases)} case(s); model: {predictor.source}", flush=True)
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
  predictor = load_predictor(f.workdir, f.model, f.checkpoint, f.tta)
  errors = predict_path(predictor, f.input, f.output, f.postprocess)
  if errors:
    sys.exit(f"{len(errors)} case(s) failed")


def _parse_flags(argv: list[str]) -> list[str]:
  rest = app.parse_flags_with_usage(argv)
  if (flags.FLAGS.model or "").endswith(".onnx") and not flags.FLAGS["huge_pages"].present:
    # Huge pages serve XLA, and restarting on them imports JAX, which onnxruntime does without.
    flags.FLAGS.huge_pages = False
  return rest


if __name__ == "__main__":
  flags.DEFINE_string(
    "workdir",
    None,
    "A training run's workdir, several separated by commas, or an experiment directory (its "
    "fold*/ with a checkpoint): their probabilities are averaged. Or --model.",
  )
  flags.DEFINE_string(
    "model",
    None,
    "Instead of --workdir: a model.zip (JAX) or model.onnx (onnxruntime, no JAX) written by "
    "python -m vnet_jax.export.",
  )
  flags.DEFINE_string(
    "input",
    None,
    "A NIfTI file, a folder of them, a DICOM series folder or a folder tree of DICOM series.",
    required=True,
  )
  flags.DEFINE_string("output", None, "Output folder for <case>.nii.gz.", required=True)
  flags.DEFINE_string(
    "checkpoint",
    None,
    "With --workdir: best (validation mean Dice; the default), latest, or a step number.",
  )
  flags.DEFINE_bool(
    "tta",
    None,
    "Mirror test-time augmentation over the three axes (8x slower): --tta or --notta; "
    "default: the run's config.inference.tta (or the model file's).",
  )
  flags.DEFINE_enum(
    "postprocess",
    "auto",
    POSTPROCESS_MODES,
    "Keep only the largest connected component: auto (the classes the experiment's "
    "postprocessing.json lists, if any, or those the model file records), none, or largest "
    "(every foreground class).",
  )
  cli.run(main, flags_parser=_parse_flags)
