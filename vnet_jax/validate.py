"""Validation during training: sliding-window prediction of the validation fold, scored like
FLARE22 at the working spacing.

A `Validator` is built once per run, so the predictor is compiled once; each evaluation only
sends the current weights to the devices. With several hosts, each host predicts its own share
of the validation cases on its own devices (no cross-host collectives in the forward pass), and
the per-case scores are gathered on every host, so all of them agree on the summary (and on the
best checkpoint).

Each host also writes its own cases' predictions into the run's `eval/predictions/`:
`<case>.nii.gz`, the labels in the case's original geometry (the image file's voxel grid and
header), from which `python -m vnet_jax.evaluate --cv` decides the postprocessing, and
`<case>.npz` ("labels" on the working grid), which the report draws over the cached image.
Both come from the same probabilities (float16, one case at a time, as in predict); the NIfTI
maps them back class by class as predict does, so postprocessing is decided on the labels that
predict would give. Mapping the working-grid labels back by nearest neighbour would be cheaper,
but its organ borders differ from predict's.
"""

import json
from pathlib import Path

import jax
import ml_collections
import nibabel as nib
import numpy as np
from jax.experimental import multihost_utils

from vnet_jax import files, inference, scoring
from vnet_jax.data import layouts, preprocess
from vnet_jax.model import VNet


def nsd_tolerances(config: ml_collections.ConfigDict, names: dict[int, str]) -> dict[int, float]:
  """FLARE22's per-organ tolerances when the classes are FLARE22's organs, else one value in mm."""
  foreground = [c for c in names if c]
  if all(layouts.FLARE22_CLASSES.get(c) == names[c] for c in foreground):
    return {c: float(layouts.FLARE22_TOLERANCES_MM[c]) for c in foreground}
  return {c: float(config.inference.nsd_tolerance_mm) for c in foreground}


def host_share(case_ids, process_index: int, process_count: int) -> list[str]:
  """This host's validation cases: every process_count-th, so the shares differ by one at most."""
  return list(case_ids)[process_index::process_count]


def gather_from_hosts(obj) -> list:
  """Every host's JSON-serialisable `obj`, in process order, on every host."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(gathered[i, : int(sizes[i, 0])].tobytes()) for i in range(len(gathered))]


def _image_header(meta: dict) -> nib.Nifti1Header | None:
  """The header of the case's first image file; None when it cannot be read there.

  The cache can outlive the dataset's location (its hash does not cover the root), and the
  meta's affine alone still gives the original geometry.
  """
  try:
    return nib.load(meta["image_files"][0]).header
  except (OSError, nib.filebasedimages.ImageFileError):
    return None


def write_original_geometry(path: Path, probs: np.ndarray, meta: dict) -> None:
  """Working-grid class probabilities (D, H, W, C) -> uint8 labels on the case's original voxel
  grid, written to `path` (.nii.gz) with the image file's header and affine, atomically."""
  labels = preprocess.probabilities_to_original(probs, meta)
  with files.replacing(path, ".nii.gz") as tmp:
    preprocess.write_labels_nifti(tmp, labels, meta, _image_header(meta))


class Validator:
  """Predicts and scores a run's validation cases with whatever weights it is given."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    model: VNet,
    variables: dict,
    cache,
    val_ids,
    names: dict[int, str],
  ):
    self.cache = cache
    self.names = names
    self.val_ids = list(val_ids)
    self.case_ids = host_share(val_ids, jax.process_index(), jax.process_count())
    self.tolerances = nsd_tolerances(config, names)
    model = model.clone(deep_supervision=False)  # inference reads the full-resolution head only
    self.predictor = inference.SlidingWindowPredictor(
      lambda v, x: model.apply(v, x, train=False),
      variables,
      window=tuple(config.patch_size),
      num_classes=len(names),
      overlap=config.inference.overlap,
      tta=config.inference.tta,
      windows_per_device=config.inference.windows_per_device,
      devices=jax.local_devices(),
    )

  def __call__(self, variables: dict, predictions_dir: Path | None = None) -> dict:
    """The FLARE22 summary of every validation case (all hosts' shares) under `variables`.

    With predictions_dir, each of this host's cases is written there as <case>.nii.gz (original
    geometry) and <case>.npz (working grid), see the module docstring.
    """
    self.predictor.set_variables(variables)
    spacing = self.cache.plan["target_spacing"]
    scores = {}
    for case_id in self.case_ids:
      image, label = self.cache.load_case(case_id)
      image = np.asarray(image, np.float32)
      if predictions_dir is None:
        pred = self.predictor.predict_labels(image)
      else:
        probs = self.predictor.predict_probabilities(image)  # float16, as predict maps back
        pred = np.argmax(probs, axis=-1).astype(np.uint8)
        write_original_geometry(
          predictions_dir / f"{case_id}.nii.gz", probs, self.cache.load_meta(case_id)
        )
        del probs
        with files.replacing(predictions_dir / f"{case_id}.npz", ".npz") as tmp:
          np.savez_compressed(tmp, labels=pred)
      # Arrays are (z, y, x): the axial axis for the slice-scored vessels is axis 0.
      by_id = scoring.evaluate_case(
        pred, np.asarray(label), spacing, list(self.tolerances), self.tolerances, slice_axis=0
      )
      scores[case_id] = {self.names[c]: v for c, v in by_id.items()}
    all_scores = {}
    for host_scores in gather_from_hosts(scores):
      all_scores.update(host_scores)
    return scoring.summarize({case_id: all_scores[case_id] for case_id in self.val_ids})
