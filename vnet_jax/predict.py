r"""Segment new scans with a trained run, written back in each scan's original geometry.

  python -m vnet_jax.predict --workdir=runs/flare22/fold0 --input=PATH --output=DIR \
      [--checkpoint=best|latest|STEP] [--tta | --notta]

PATH is a NIfTI file or a folder of them (FLARE22 / nnU-Net names: multi-channel cases are
grouped by their `_XXXX` suffix). Each case is preprocessed as in training (WORKDIR/plan.json),
predicted with a Gaussian-weighted sliding window, mapped back (undo resampling, crop and
reorientation) and written as DIR/<case>.nii.gz, uint8, with the input's shape, sform and qform.
A bad input file is reported on one line and skipped; the exit code is 1 if any case failed.
"""

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
from absl import app, flags

from vnet_jax import checkpoint, cli, inference
from vnet_jax import model as model_lib
from vnet_jax.data import layouts, preprocess
from vnet_jax.errors import DataError


class Predictor:
  """A trained run's model, weights and preprocessing plan, ready to segment NIfTI cases."""

  def __init__(self, workdir: str | Path, which: str = "best", tta: bool | None = None):
    workdir = Path(workdir)
    try:
      self.config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
      self.plan = json.loads((workdir / "plan.json").read_text())
    except FileNotFoundError as e:
      raise DataError(
        f"{e.filename}: missing; is {workdir} the workdir of a training run?"
      ) from None
    self.class_names = {int(k): v for k, v in self.plan["class_names"].items()}
    model = model_lib.build_model(
      self.config, len(self.class_names), self.plan["num_channels"]
    ).clone(deep_supervision=False)  # the full-resolution head only
    manager = checkpoint.make_manager(workdir, read_only=True)
    self.step = checkpoint.resolve_step(manager, which)
    window = tuple(self.config.patch_size)
    x = jax.ShapeDtypeStruct((1, *window, model.in_channels), jnp.float32)
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    variables = checkpoint.restore_variables(manager, self.step, template)
    inf = self.config.inference
    self.window = inference.SlidingWindowPredictor(
      lambda v, x: model.apply(v, x, train=False),
      variables,
      window=window,
      num_classes=len(self.class_names),
      overlap=inf.overlap,
      tta=inf.tta if tta is None else tta,
      windows_per_device=inf.windows_per_device,
    )

  def predict_case(self, case: layouts.Case) -> tuple[np.ndarray, dict, dict[str, float]]:
    """Returns (uint8 labels on the original voxel grid, meta, seconds per stage)."""
    times = {}
    t0 = time.perf_counter()
    image, meta = preprocess.preprocess_image(case.image_files, self.plan)
    t1 = time.perf_counter()
    probs = self.window.predict_probabilities(image)
    t2 = time.perf_counter()
    labels = preprocess.probabilities_to_original(probs, meta)
    t3 = time.perf_counter()
    times.update(preprocess=t1 - t0, sliding_window=t2 - t1, map_back=t3 - t2)
    return labels, meta, times


def predict_path(
  workdir: str | Path,
  input_path: str | Path,
  output_dir: str | Path,
  which: str = "best",
  tta: bool | None = None,
) -> list[str]:
  """Predicts every case under input_path; returns the one-line errors of the cases that failed."""
  cases = layouts.discover_images(input_path)
  predictor = Predictor(workdir, which, tta)
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  print(f"{len(cases)} case(s), checkpoint step {predictor.step}", flush=True)
  errors = []
  for i, case in enumerate(cases, 1):
    try:
      start = time.perf_counter()
      labels, meta, times = predictor.predict_case(case)
      out = output_dir / f"{case.case_id}.nii.gz"
      tmp = output_dir / f".{case.case_id}.tmp.nii.gz"
      preprocess.write_labels_nifti(tmp, labels, meta, nib.load(case.image_files[0]).header)
      tmp.replace(out)  # a killed run never leaves a truncated prediction under the final name
      stages = ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
      print(
        f"[{i}/{len(cases)}] {case.case_id}: {time.perf_counter() - start:.1f}s ({stages})"
        f" -> {out}",
        flush=True,
      )
    except DataError as e:
      errors.append(str(e))
      print(f"[{i}/{len(cases)}] error: {e}", file=sys.stderr, flush=True)
  return errors


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  errors = predict_path(f.workdir, f.input, f.output, f.checkpoint, f.tta)
  if errors:
    sys.exit(f"{len(errors)} case(s) failed")


if __name__ == "__main__":
  flags.DEFINE_string(
    "workdir",
    None,
    "Workdir of a training run (config.json, plan.json, checkpoints/).",
    required=True,
  )
  flags.DEFINE_string("input", None, "A NIfTI file or a folder of them.", required=True)
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
  cli.run(main)
