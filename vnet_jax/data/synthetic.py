r"""A FLARE22-like synthetic CT dataset on disk, so that everything runs without downloading data.

  python -m vnet_jax.data.synthetic --out=data/synthetic --cases=20 [--layout=flare22|nnunet]
      [--seed=0] [--size=X,Y,Z] [--spacing=X,Y,Z]

Each case is a phantom from `phantom.make_case` (abdominal anatomy and the 13 FLARE22 organs,
int16 HU images, uint8 labels), written in the FLARE22 or the nnU-Net v2 layout.

Orientation: the anatomy is generated in a canonical RAS+ voxel grid (axis 0 towards the
patient's right, 1 anterior, 2 superior), then each case is stored in one of several orientations
(RAS, LPS, LAS, LPI and two axis permutations) with the voxel array and the affine changed
together, so `nibabel.as_closest_canonical` recovers the same anatomy for every case.

`size` and `spacing` are in NIfTI voxel order (x, y, z) of that canonical grid: the shape of the
array `make_case` returns, not the package's (D, H, W).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from absl import flags
from nibabel import orientations as nio

from vnet_jax import cli
from vnet_jax.data.layouts import FLARE22_CLASSES
from vnet_jax.data.phantom import make_case
from vnet_jax.errors import DataError, one_line

LAYOUTS = ("flare22", "nnunet")

# Storage orientations, cycled over cases: a common LPS (DICOM-derived), the canonical RAS,
# a left-right flip, a superior-inferior flip, an in-plane axis swap and a coronal-like
# permutation, so a loader that ignores the affine visibly fails.
ORIENTATIONS = ("LPS", "RAS", "LAS", "PLS", "LPI", "RSA")


def case_ids(num_cases: int) -> list[str]:
  return [f"FLARE22_Tr_{i:04d}" for i in range(1, num_cases + 1)]


def reorient(
  image: np.ndarray, label: np.ndarray, affine: np.ndarray, axcodes: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Store the same physical anatomy with voxel axes pointing along `axcodes` (e.g. "LPS")."""
  transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(axcodes)))
  new_affine = affine @ nio.inv_ornt_aff(transform, image.shape)
  return (
    np.ascontiguousarray(nio.apply_orientation(image, transform)),
    np.ascontiguousarray(nio.apply_orientation(label, transform)),
    new_affine,
  )


def _save(array: np.ndarray, affine: np.ndarray, path: str, tmp_dir: str) -> None:
  img = nib.Nifti1Image(array, affine)
  img.set_sform(affine, code=1)
  img.set_qform(affine, code=1)
  img.header.set_data_dtype(array.dtype)
  img.header.set_xyzt_units("mm")
  # Written beside the target and renamed, so an interrupted run never leaves a truncated file.
  tmp = os.path.join(tmp_dir, os.path.basename(path))
  nib.save(img, tmp)
  os.replace(tmp, path)


def write_dataset(
  out_dir: str,
  num_cases: int,
  layout: str = "flare22",
  seed: int = 0,
  shape: Sequence[int] | None = None,
  spacing: Sequence[float] | None = None,
) -> list[str]:
  """Write `num_cases` synthetic cases in the FLARE22 or nnU-Net v2 layout; returns case ids.

  Case i depends only on (seed, i), so a larger dataset extends a smaller one. Re-running into
  the same directory overwrites the same files; a directory holding other cases is refused.
  """
  if layout not in LAYOUTS:
    raise DataError(f"layout {layout!r}: expected one of {LAYOUTS}")
  if num_cases < 1:
    raise DataError(f"num_cases={num_cases}: need at least one case")
  images_dir = os.path.join(out_dir, "images" if layout == "flare22" else "imagesTr")
  labels_dir = os.path.join(out_dir, "labels" if layout == "flare22" else "labelsTr")
  ids = case_ids(num_cases)
  wanted = {f"{c}_0000.nii.gz" for c in ids} | {f"{c}.nii.gz" for c in ids}
  for d in (images_dir, labels_dir):
    extra = sorted(set(os.listdir(d)) - wanted) if os.path.isdir(d) else []
    if extra:
      raise DataError(
        f"{d}: already holds {len(extra)} other file(s) (e.g. {extra[0]}); "
        "write the synthetic dataset to an empty directory"
      )
    os.makedirs(d, exist_ok=True)
  tmp_dir = os.path.join(out_dir, ".synthetic_partial")
  os.makedirs(tmp_dir, exist_ok=True)
  for i, case in enumerate(ids):
    rng = np.random.default_rng([seed, i])
    image, label, affine = make_case(rng, shape, spacing)
    axcodes = ORIENTATIONS[(seed + i) % len(ORIENTATIONS)]  # cycled: any two cases differ
    image, label, affine = reorient(image, label, affine, axcodes)
    _save(image, affine, os.path.join(images_dir, f"{case}_0000.nii.gz"), tmp_dir)
    _save(label, affine, os.path.join(labels_dir, f"{case}.nii.gz"), tmp_dir)
  shutil.rmtree(tmp_dir, ignore_errors=True)
  if layout == "nnunet":
    dataset = {
      "name": "SyntheticFLARE22",
      "channel_names": {"0": "CT"},
      "labels": {name: k for k, name in sorted(FLARE22_CLASSES.items())},
      "numTraining": num_cases,
      "file_ending": ".nii.gz",
    }
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
      json.dump(dataset, f, indent=2)
  return ids


def _parse_triple(text: str, kind, flag: str):
  if not text:
    return None
  try:
    values = tuple(kind(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != 3:
    raise DataError(f"--{flag}={text}: expected three comma-separated numbers X,Y,Z")
  return values


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise DataError(f"unexpected arguments: {' '.join(argv[1:])}")
  start = time.perf_counter()
  try:
    ids = write_dataset(
      f.out,
      f.cases,
      layout=f.layout,
      seed=f.seed,
      shape=_parse_triple(f.size, int, "size"),
      spacing=_parse_triple(f.spacing, float, "spacing"),
    )
  except OSError as e:  # e.g. an unwritable --out: one line, like the package's other errors
    raise DataError(f"{e.filename or f.out}: cannot write ({e.strerror or one_line(e)})") from None
  print(
    f"wrote {len(ids)} synthetic cases ({f.layout} layout) to {f.out} "
    f"in {time.perf_counter() - start:.1f} s"
  )


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_integer("cases", 10, "Number of cases.", lower_bound=1)
  flags.DEFINE_enum(
    "layout",
    "flare22",
    list(LAYOUTS),
    "flare22 (images/, labels/) or nnunet (dataset.json, imagesTr/, labelsTr/).",
  )
  flags.DEFINE_integer("seed", 0, "Random seed; case i depends only on (seed, i).")
  flags.DEFINE_string(
    "size", "", "X,Y,Z voxels of every case (default: 96-128 in-plane, 24-48 slices)."
  )
  flags.DEFINE_string(
    "spacing", "", "X,Y,Z mm of every case (default: 0.7-0.9 in-plane, 2.5-5 between slices)."
  )
  cli.run(main, huge_pages=False)
