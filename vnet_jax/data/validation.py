"""Checks of the user's NIfTI files before (headers) and while (content) they are preprocessed.

`validate_dataset` reads only headers, for every case, so a bad file is found in seconds and
before any long preprocessing starts. Content problems (truncated data, NaN/inf intensities,
undeclared label values) can only be seen once the voxels are read: preprocessing reads each
volume once with `read_volume` and calls `check_case_content` on it. Every problem is a
`DataError` whose message is one line, `"<path>: <reason>"`. Images already in memory (a DICOM
series read by `data.dicom`) get the same header and content checks (`open_image`), their
errors naming where they came from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from vnet_jax.data.folds import check_num_folds, parse_fold
from vnet_jax.data.geometry import ras_zyx
from vnet_jax.data.layouts import Case, Dataset
from vnet_jax.errors import DataError, one_line

# Image and label grids must agree to this precision: the direction*spacing matrix to 1e-3
# relative, the origin to 1e-3 of the smallest voxel plus 1e-4 mm (float32 header rounding).
AFFINE_RTOL = 1e-3
ORIGIN_VOXEL_TOL = 1e-3
ORIGIN_ATOL_MM = 1e-4


@dataclasses.dataclass(frozen=True)
class VolumeHeader:
  """What the header says about one file. `shape` has trailing singleton axes removed."""

  path: Path
  shape: tuple[int, int, int]
  affine: np.ndarray
  spacing: tuple[float, float, float]  # voxel size along the file's own axes (mm)


@dataclasses.dataclass(frozen=True)
class CaseHeader:
  """Header facts of a case (from channel 0); `spacing_zyx` is after RAS reorientation."""

  case_id: str
  shape: tuple[int, int, int]
  affine: np.ndarray
  spacing: tuple[float, float, float]
  spacing_zyx: tuple[float, float, float]
  shape_zyx: tuple[int, int, int]


# A scan to check or read: a NIfTI file, or an image already in memory (e.g. a DICOM series).
ImageSource = str | Path | nib.Nifti1Image


def read_header(path: str | Path) -> tuple[VolumeHeader, nib.Nifti1Image]:
  """Opens a NIfTI file reading only its header; DataError if unreadable, not 3D, bad affine."""
  path = Path(path)
  try:
    img = nib.load(str(path), mmap=False)
  except FileNotFoundError:
    raise DataError(f"{path}: file not found") from None
  except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib.error...)
    raise DataError(f"{path}: cannot read NIfTI header ({one_line(e)})") from None
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise DataError(f"{path}: not a NIfTI image ({type(img).__name__})")
  header = image_header(img, path)
  if str(path).endswith(".nii"):
    # Uncompressed files: a truncation is visible from the size alone, no need to read voxels.
    offset = getattr(img.dataobj, "offset", None)  # the loaded header's offset is reset to 0
    offset = int(img.header["vox_offset"]) if offset is None else int(offset)
    needed = offset + int(np.prod(img.shape)) * img.header.get_data_dtype().itemsize
    actual = os.path.getsize(path)
    if actual < needed:
      raise DataError(f"{path}: file truncated ({actual} bytes, header needs {needed})")
  return header, img


def image_header(img: nib.Nifti1Image, source: str | Path) -> VolumeHeader:
  """The header checks of `read_header` (3D, non-degenerate affine) on a loaded or in-memory
  image; errors name `source`, where the image came from."""
  path = Path(source)
  shape = tuple(int(s) for s in img.shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    extra = f" with {int(np.prod(shape[3:]))} volumes" if len(shape) > 3 else ""
    raise DataError(
      f"{path}: {len(shape)}D image{extra} {tuple(img.shape)}; expected a 3D "
      "volume (one file per channel)"
    )
  if min(shape) < 1:
    raise DataError(f"{path}: empty image shape {shape}")
  affine = np.asarray(img.affine, np.float64)
  spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
  if (
    not np.all(np.isfinite(affine))
    or not np.all(spacing > 0)
    or abs(np.linalg.det(affine[:3, :3])) < 1e-12 * float(np.prod(spacing))
  ):
    raise DataError(f"{path}: degenerate affine (voxel size {spacing.round(4).tolist()})")
  return VolumeHeader(path, shape, affine, tuple(float(s) for s in spacing))


def source_path(image: ImageSource, source: str | Path | None = None) -> Path:
  """What errors about `image` name: its file, else `source`, else its own file name if any."""
  if isinstance(image, (str, Path)):
    return Path(image)
  return Path(source or image.get_filename() or "<in-memory image>")


def open_image(
  image: ImageSource, source: str | Path | None = None
) -> tuple[VolumeHeader, nib.Nifti1Image]:
  """`read_header` for a file; the same checks for an in-memory image (named by `source`)."""
  if isinstance(image, (str, Path)):
    return read_header(image)
  return image_header(image, source_path(image, source)), image


def affines_close(a: np.ndarray, b: np.ndarray) -> bool:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
  lin_ok = np.abs(a[:3, :3] - b[:3, :3]).max() <= AFFINE_RTOL * spacing.max()
  origin_ok = np.abs(a[:3, 3] - b[:3, 3]).max() <= ORIGIN_VOXEL_TOL * spacing.min() + ORIGIN_ATOL_MM
  return bool(lin_ok and origin_ok)


def check_images_header(
  image_files: Sequence[ImageSource], case_id: str = "", source: str | Path | None = None
) -> CaseHeader:
  """Header checks for the channel images of one case (same shape and affine): files, or
  in-memory images named by `source` in errors."""
  first, _ = open_image(image_files[0], source)
  for image in image_files[1:]:
    h, _ = open_image(image, source)
    f = h.path
    if h.shape != first.shape:
      raise DataError(
        f"{f}: shape {h.shape} differs from channel 0 {first.path.name} {first.shape}"
      )
    if not affines_close(h.affine, first.affine):
      raise DataError(
        f"{f}: affine differs from channel 0 {first.path.name} "
        f"(origin {h.affine[:3, 3].round(3).tolist()} vs "
        f"{first.affine[:3, 3].round(3).tolist()})"
      )
  spacing_zyx, shape_zyx = ras_zyx(first.affine, first.shape, first.spacing)
  return CaseHeader(case_id, first.shape, first.affine, first.spacing, spacing_zyx, shape_zyx)


def check_case_header(case: Case) -> CaseHeader:
  """Header checks for one case: readable 3D channels and label on the same grid."""
  header = check_images_header(case.image_files, case.case_id)
  if case.label_file is not None:
    lab, _ = read_header(case.label_file)
    if lab.shape != header.shape:
      raise DataError(
        f"{case.label_file}: label shape {lab.shape} differs from image "
        f"{case.image_files[0].name} {header.shape}"
      )
    if not affines_close(lab.affine, header.affine):
      diff = np.abs(lab.affine - header.affine).max()
      raise DataError(
        f"{case.label_file}: label affine differs from image "
        f"{case.image_files[0].name} (max difference {diff:.3g})"
      )
  return header


def validate_dataset(
  dataset: Dataset,
  num_folds: int | None = None,
  fold: int | str | None = None,
  check_content: bool = False,
) -> dict[str, CaseHeader]:
  """Header checks on every case (fast), fold arguments, and optionally the voxel content.

  Returns the headers by case id (preprocessing reuses them, e.g. for the median spacing).
  With `check_content` every volume is also read and checked (slow; preprocessing does this
  anyway while it reads each case once).
  """
  if not dataset.cases:
    raise DataError(f"{dataset.root}: empty dataset, no cases")
  if num_folds is not None:
    check_num_folds(len(dataset.cases), num_folds, str(dataset.root))
  if fold is not None:
    parse_fold(fold, num_folds, str(dataset.root))
  headers = {c.case_id: check_case_header(c) for c in dataset.cases}
  if check_content:
    for c in dataset.cases:
      images, label = read_case_arrays(c)
      check_case_content(c, images, label, dataset.class_names)
  return headers


def read_volume(
  image: ImageSource, source: str | Path | None = None
) -> tuple[np.ndarray, VolumeHeader]:
  """Reads all voxels of a 3D NIfTI file or in-memory image (scaled by slope/intercept);
  DataError if unreadable."""
  header, img = open_image(image, source)
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # truncated gzip: EOFError, zlib.error, OSError, ValueError...
    raise DataError(f"{header.path}: cannot read image data ({one_line(e)})") from None
  return np.asarray(data).reshape(header.shape), header


def read_case_arrays(case: Case) -> tuple[list[np.ndarray], np.ndarray | None]:
  images = [read_volume(f)[0] for f in case.image_files]
  label = read_volume(case.label_file)[0] if case.label_file is not None else None
  return images, label


def _chunks(a: np.ndarray, max_elems: int = 1 << 22) -> Iterable[np.ndarray]:
  """Slabs along axis 0 so whole-volume checks never allocate a volume-sized temporary."""
  step = max(1, max_elems // max(1, int(np.prod(a.shape[1:]))))
  for i in range(0, a.shape[0], step):
    yield a[i : i + step]


def label_values(label: np.ndarray, path: Path | str = "label") -> np.ndarray:
  """Sorted distinct label values as int64; DataError for non-integer values."""
  values: set[int] = set()
  integer = np.issubdtype(label.dtype, np.integer) or label.dtype == bool
  for slab in _chunks(label):
    if not integer:
      bad = ~np.isfinite(slab) | (slab != np.round(slab))
      if bad.any():
        raise DataError(f"{path}: label has non-integer values (e.g. {slab[bad].flat[0]!r})")
    values.update(np.unique(slab).astype(np.int64).tolist())
  return np.array(sorted(values), np.int64)


def check_case_content(
  case: Case,
  image_arrays: Sequence[np.ndarray],
  label_array: np.ndarray | None,
  class_ids: Iterable[int] | None = None,
) -> np.ndarray | None:
  """Content checks on loaded voxels: finite intensities, declared integer label values.

  `class_ids` are the declared classes (a dict of names works); None skips the label-value
  check. Returns the label's distinct values (or None without a label).
  """
  for f, arr in zip(case.image_files, image_arrays):
    if np.issubdtype(arr.dtype, np.floating):
      bad = sum(int((~np.isfinite(s)).sum()) for s in _chunks(arr))
      if bad:
        raise DataError(f"{f}: {bad} NaN/inf intensity value(s)")
  if label_array is None:
    return None
  values = label_values(label_array, case.label_file)
  if class_ids is not None:
    declared = {int(c) for c in class_ids}
    undeclared = [int(v) for v in values if int(v) not in declared]
    if undeclared:
      raise DataError(
        f"{case.label_file}: label value(s) {undeclared[:10]} not declared in "
        f"the dataset's classes {sorted(declared)}"
      )
  return values
