"""The per-case transform (reorient, crop, normalise, resample) and mapping predictions back.

Per case, in this order:
1. read every channel and the label once, check the content (`validation.check_case_content`);
2. reorient to RAS, then transpose to the package's (z, y, x) (`geometry`);
3. crop to the bounding box of the body (CT: > -500 HU; other channels: nonzero) united with
   the labelled voxels;
4. normalise each channel (schemes: `plan`): 'zscore' uses the case's own mean/std over the
   body mask (before resampling, at the original resolution); 'ct' after resampling, so the
   cache's two-pass path and single-case prediction give identical voxels; 'none' only casts;
5. resample to the target spacing (before the 'ct' step above): images trilinear, labels per
   class linear and argmax (`resample`).

`preprocess_arrays` does 2-5 for the cache (`cache`) and `preprocess_image` for a new scan
(NIfTI files or an image in memory, e.g. a DICOM series);
`labels_to_original` / `probabilities_to_original` invert them with the case's meta, and
`write_labels_nifti` writes the result in the input's geometry.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from vnet_jax.data import resample
from vnet_jax.data.geometry import bbox, from_ras_zyx, preprocessed_affine, to_ras_zyx
from vnet_jax.data.layouts import Case
from vnet_jax.data.plan import ct_stats_known
from vnet_jax.data.validation import (
  CaseHeader,
  ImageSource,
  check_case_content,
  check_images_header,
  read_volume,
  source_path,
)
from vnet_jax.errors import DataError


def _sample_rng(case_id: str, salt: int = 0) -> np.random.Generator:
  # Seeded by case id: the plan does not depend on worker count or scheduling.
  return np.random.default_rng([zlib.crc32(case_id.encode()), salt])


def preprocess_arrays(
  images: list[np.ndarray],
  label: np.ndarray | None,
  header: CaseHeader,
  plan: dict,
  case_id: str,
  n_fg_samples: int = 0,
):
  """Reorient, crop, normalise, resample ('ct' channels only when the plan has statistics).

  Returns (image float32 (D,H,W,C), label uint8 (D,H,W) or None, meta, fg samples per CT
  channel (only when `n_fg_samples`)). The cache's workers and `preprocess_image` both call it.
  """
  ornt = nib.orientations.io_orientation(header.affine)
  norms = plan["normalization"]
  views = [to_ras_zyx(im, ornt) for im in images]
  lab = labelled = None
  if label is not None:
    lab = to_ras_zyx(label, ornt).astype(np.uint8)  # values checked to be 0..255
    # Crop box and CT statistics use the original labels, so they do not depend on label_map
    # (an experiment keeping one small organ must not get a window fitted to that organ).
    labelled = lab > 0
    lab = np.asarray(plan["label_lut"], np.uint8)[lab]
  ras_shape = tuple(int(s) for s in views[0].shape)

  body = np.zeros(ras_shape, bool)  # image-only mask: prediction time has no label
  for v, n in zip(views, norms):
    body |= (v > plan["ct_body_threshold"]) if n["scheme"] == "ct" else (v != 0)
  box = None
  if plan["crop_to_nonzero"]:
    box = bbox(body | labelled) if labelled is not None else bbox(body)
  if box is None:
    box = [[0, s] for s in ras_shape]
  crop = tuple(slice(lo, hi) for lo, hi in box)
  cropped_shape = tuple(hi - lo for lo, hi in box)
  body = body[crop]
  if lab is not None:
    lab, labelled = lab[crop], labelled[crop]

  spacing = np.asarray(header.spacing_zyx, np.float64)
  target = np.asarray(plan["target_spacing"], np.float64)
  out_shape = tuple(
    int(s) for s in np.maximum(1, np.round(np.asarray(cropped_shape) * spacing / target))
  )
  image = np.empty(out_shape + (len(views),), np.float32)
  samples, case_norm = {}, []
  for c, (v, n) in enumerate(zip(views, norms)):
    x = np.array(v[crop], np.float32)
    if n["scheme"] == "ct":
      if n_fg_samples:
        fg = labelled if labelled is not None and labelled.any() else body
        idx = np.flatnonzero(fg)
        if idx.size > n_fg_samples:
          idx = np.sort(_sample_rng(case_id, c).choice(idx, n_fg_samples, replace=False))
        samples[c] = x.ravel()[idx]
      case_norm.append({})  # clipped and z-scored after resampling, below
    elif n["scheme"] == "zscore":
      vals = x[body] if plan["crop_to_nonzero"] and body.any() else x
      mean, std = float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64))
      x -= mean
      x /= max(std, 1e-8)
      case_norm.append({"mean": mean, "std": std})
    else:
      case_norm.append({})
    image[..., c] = resample.resample_linear(x, out_shape)
    del x
  del body, labelled
  if ct_stats_known(plan):
    # After resampling in every path (the two-pass cache, a resumed case, prediction), so the
    # same case always gives the same voxels; z-scoring commutes with linear interpolation.
    apply_ct_normalization(image, plan)

  meta: dict[str, Any] = {
    "case_id": case_id,
    "original_affine": np.asarray(header.affine).tolist(),
    "original_shape": list(header.shape),
    "original_spacing": list(header.spacing),
    "ornt": ornt.astype(int).tolist(),
    "ras_shape_zyx": list(ras_shape),
    "spacing_zyx": list(header.spacing_zyx),
    "crop_box_zyx": box,
    "cropped_shape_zyx": list(cropped_shape),
    "resampled_shape": list(out_shape),
    "resampled_spacing": (np.asarray(cropped_shape) * spacing / np.asarray(out_shape)).tolist(),
    "target_spacing": list(plan["target_spacing"]),
    "case_normalization": case_norm,
  }
  meta["preprocessed_affine"] = preprocessed_affine(meta).tolist()
  out_label = None
  if lab is not None:
    out_label = resample.resample_labels(lab, out_shape)
    meta.update(_class_summary(out_label, plan["num_classes"]))
  return image, out_label, meta, samples


def _class_summary(label: np.ndarray, num_classes: int) -> dict:
  counts = np.zeros(max(num_classes, 1), np.int64)
  flat = label.reshape(-1)
  for i in range(0, flat.size, resample.CHUNK_ELEMS):
    counts += np.bincount(flat[i : i + resample.CHUNK_ELEMS], minlength=counts.size)[: counts.size]
  return {"class_voxels": {str(c): int(n) for c, n in enumerate(counts) if n}}


def apply_ct_normalization(image: np.ndarray, plan: dict) -> None:
  """In place: each 'ct' channel clipped to its window and z-scored with the dataset's stats."""
  for c, n in enumerate(plan["normalization"]):
    if n["scheme"] == "ct":
      x = image[..., c]
      np.clip(x, n["clip"][0], n["clip"][1], out=x)
      x -= n["mean"]
      x /= n["std"]


def preprocess_image(
  images: Sequence[ImageSource], plan: dict, source: str | Path | None = None
) -> tuple[np.ndarray, dict]:
  """Preprocesses a new (unlabelled) case exactly like the cached ones: (image float32
  (D,H,W,C), meta) where meta maps predictions back with `labels_to_original` and
  `probabilities_to_original`.

  `images` are the case's channels in order: NIfTI files, or nibabel images already in memory
  (e.g. a DICOM series), which errors name by `source` (e.g. the series' folder).
  """
  images = list(images)
  names = tuple(source_path(im, source) for im in images)
  if len(images) != plan["num_channels"]:
    raise DataError(
      f"{names[0] if names else '<no images>'}: {len(images)} channel file(s) given "
      f"but the model expects {plan['num_channels']} {plan['channel_names']}"
    )
  header = check_images_header(images, source=source)
  volumes = [read_volume(im, source)[0] for im in images]
  case = Case(names[0].name, names, None)
  check_case_content(case, volumes, None)
  if not ct_stats_known(plan):
    raise ValueError("plan has no CT statistics (an incomplete plan.pending.json?)")
  image, _, meta, _ = preprocess_arrays(volumes, None, header, plan, case.case_id)
  meta["image_files"] = [str(n) for n in names]
  return image, meta


def labels_to_original(labels: np.ndarray, meta: dict) -> np.ndarray:
  """Preprocessed-grid labels (D,H,W) -> uint8 labels on the original file's voxel grid.

  Nearest-neighbour resampling back to the cropped grid, zero padding outside the crop box,
  then the inverse transpose and reorientation: write it with `meta["original_affine"]`
  (see `write_labels_nifti`) to reproduce the input's geometry exactly.
  """
  res, cropped = tuple(meta["resampled_shape"]), tuple(meta["cropped_shape_zyx"])
  if tuple(labels.shape) != res:
    raise ValueError(f"labels shape {labels.shape} != preprocessed shape {res}")
  idx = [resample.nearest_index(res[ax], cropped[ax]) for ax in range(3)]
  full = np.zeros(meta["ras_shape_zyx"], np.uint8)
  full[tuple(slice(lo, hi) for lo, hi in meta["crop_box_zyx"])] = np.asarray(labels)[np.ix_(*idx)]
  return from_ras_zyx(full, meta)


def probabilities_to_original(probs: np.ndarray, meta: dict) -> np.ndarray:
  """Class probabilities (D,H,W,C) on the preprocessed grid -> uint8 argmax labels on the
  original voxel grid, resampling each class linearly.

  Memory bounded: the original grid is filled in blocks of slices, one class at a time, keeping
  a running max and argmax, so no float32 copy of all classes at the original resolution exists
  (a 512x512x300 CT with 14 classes needs well under 1 GB beyond the input and the output).
  """
  res, cropped = tuple(meta["resampled_shape"]), tuple(meta["cropped_shape_zyx"])
  if tuple(probs.shape[:3]) != res:
    raise ValueError(f"probabilities shape {probs.shape} does not start with {res}")
  maps = [resample.axis_map(res[ax], cropped[ax]) for ax in range(3)]
  full = np.zeros(meta["ras_shape_zyx"], np.uint8)
  (z0c, _), (y0, y1), (x0, x1) = meta["crop_box_zyx"]
  step = max(1, resample.CHUNK_ELEMS // max(1, cropped[1] * cropped[2]))
  for z0 in range(0, cropped[0], step):
    z1 = min(cropped[0], z0 + step)
    best, arg = None, None
    for c in range(probs.shape[3]):
      v = resample.interp_block(probs[..., c], maps, (z0, 0, 0), (z1,) + cropped[1:])
      if best is None:
        best, arg = np.array(v, np.float32), np.zeros(v.shape, np.uint8)
        continue
      upd = v > best
      best[upd] = v[upd]
      arg[upd] = c
    full[z0c + z0 : z0c + z1, y0:y1, x0:x1] = arg
  return from_ras_zyx(full, meta)


def write_labels_nifti(
  path: str | Path, labels: np.ndarray, meta: dict, reference_header: nib.Nifti1Header | None = None
) -> None:
  """Writes original-grid labels (from `labels_to_original`) as uint8 with the original affine.

  With the input's header, its sform and qform (and their codes) are kept exactly as they were.
  """
  affine = np.asarray(meta["original_affine"], np.float64)
  if reference_header is not None:
    header = reference_header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    img = nib.Nifti1Image(np.asarray(labels, np.uint8), None, header)
  else:
    img = nib.Nifti1Image(np.asarray(labels, np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
  nib.save(img, str(path))
