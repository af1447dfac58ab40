"""DICOM series as input: discovery in a folder tree and reading into in-memory NIfTI images.

Rules:
- A DICOM file is a DICOM Part 10 file (the "DICM" marker at byte 128), whatever its name;
  `DICOMDIR` index files are ignored. A path holds DICOM when it is such a file or a folder
  tree with at least one of them; a tree that holds NIfTI files (.nii, .nii.gz) as well is
  ambiguous and raises `DataError`.
- Series are found per folder by GDCM (through SimpleITK) and told apart by
  SeriesInstanceUID, as GDCM reports it (letters, digits and '.' only, so file-name safe).
  A series must lie in one folder. Files GDCM cannot read as images (reports, structure sets,
  damaged files) are skipped with one warning naming them; a damaged slice inside a stack then
  shows as a gap, which `read_series` refuses.
- A series' `name` (a file name for its output) is its folder's name when no other series in
  the tree lies in a folder of that name (so its folder holds only this series); otherwise its
  SeriesInstanceUID. Names are unique within one `find_series` call.
- `read_series` gives the image SimpleITK's NIfTI writer would save: the same voxel grid and
  RAS+ world coordinates, sform and qform with code 1 (scanner), rescale slope and intercept
  applied (int16 when every value fits, e.g. CT in HU, else float32). The slices must form one
  regular stack: one orientation and size, evenly spaced along the slice normal (no gap or
  repeat), not sheared (gantry tilt); anything else is a one-line `DataError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from absl import logging

from vnet_jax.data.layouts import NIFTI_ENDINGS
from vnet_jax.errors import DataError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# A slice may sit this fraction of the slice step off the regular stack (rounded positions).
_STEP_TOLERANCE = 0.1
# Sheared stacks (gantry tilt) are refused once the last slice is off by this fraction of a pixel.
_SHEAR_TOLERANCE = 0.5
_NOT_AN_IMAGE = "not a DICOM image GDCM can read (damaged, or not an image)"


@dataclasses.dataclass(frozen=True)
class DicomSeries:
  """One image series: its name (see the module's rules), folder, UID and files in slice order."""

  name: str
  folder: Path
  series_uid: str
  files: tuple[Path, ...]


def _is_part10(path: Path) -> bool:
  if path.name.upper() == "DICOMDIR":
    return False
  try:
    with path.open("rb") as f:
      return f.read(132)[128:] == b"DICM"
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _dicom_files(path: Path) -> list[Path]:
  """The DICOM files at or under `path`, sorted; DataError when NIfTI files are mixed in."""
  if path.is_file():
    return [path] if _is_part10(path) else []
  files = sorted(Path(d) / f for d, _, names in os.walk(path) for f in names)
  dicom = [f for f in files if _is_part10(f)]
  nifti = [f for f in files if f.name.endswith(NIFTI_ENDINGS)]
  if dicom and nifti:
    raise DataError(
      f"{path}: holds both DICOM ({dicom[0]}) and NIfTI ({nifti[0]}) files; "
      "give a folder of one kind"
    )
  return dicom


def is_dicom_path(path: str | Path) -> bool:
  """True when `path` is a DICOM file or a folder tree of DICOM files without NIfTI files."""
  return bool(_dicom_files(Path(path)))


@contextlib.contextmanager
def _itk_warnings_hidden():
  # ITK prints e.g. "No Series were found" for a folder of reports to stderr, on many lines;
  # the skipped files are reported once, by name, instead.
  shown = sitk.ProcessObject.GetGlobalWarningDisplay()
  sitk.ProcessObject.SetGlobalWarningDisplay(False)
  try:
    yield
  finally:
    sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _folder_series(folder: Path) -> list[tuple[str, tuple[Path, ...]]]:
  """(SeriesInstanceUID, files sorted by GDCM: by position along the slice normal) per series."""
  reader = sitk.ImageSeriesReader
  with _itk_warnings_hidden():
    return [
      (uid, tuple(folder / Path(f).name for f in reader.GetGDCMSeriesFileNames(str(folder), uid)))
      for uid in reader.GetGDCMSeriesIDs(str(folder))
    ]


def _names(found: list[tuple[Path, str, tuple[Path, ...]]]) -> list[str]:
  # Two series in one folder share its name too, so both fall back to their UIDs.
  counts = Counter(folder.name for folder, _, _ in found)
  uid_names = [uid for _, uid, _ in found]
  names = [f.name if counts[f.name] == 1 else u for (f, _, _), u in zip(found, uid_names)]
  # UIDs are unique, so only a folder named like another series' UID can still clash.
  return names if len(set(names)) == len(names) else uid_names


def find_series(path: str | Path) -> list[DicomSeries]:
  """Every DICOM image series at or under `path` (a file: the series holding it), by name."""
  path = Path(path).absolute()
  if not path.exists():
    raise DataError(f"{path}: no such file or folder")
  dicom = _dicom_files(path)
  if not dicom:
    raise DataError(f"{path}: no DICOM files (none has the DICOM 'DICM' marker)")
  found, seen = [], {}
  for folder in sorted({f.parent for f in dicom}):
    for uid, files in _folder_series(folder):
      if uid in seen:
        raise DataError(
          f"series {uid} is split across {seen[uid]} and {folder}; put them in one folder"
        )
      seen[uid] = folder
      found.append((folder, uid, files))
  listed = {f for _, _, files in found for f in files}
  skipped = [f for f in dicom if f not in listed]
  if path.is_file() and skipped:
    raise DataError(f"{path}: {_NOT_AN_IMAGE}")
  if skipped:
    logging.warning(
      "skipped %d DICOM files that are not images GDCM can read (reports, structure sets or "
      "damaged files): %s",
      len(skipped),
      ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else ""),
    )
  if not found:
    raise DataError(f"{path}: no DICOM image series (no file is an image GDCM can read)")
  series = [DicomSeries(n, *s) for n, s in zip(_names(found), found)]
  if path.is_file():  # named among its folder's series, as when the folder is given
    series = [s for s in series if path in s.files]
  return sorted(series, key=lambda s: s.name)


def _slice_header(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], tuple[float, ...]]:
  """(ImagePositionPatient, direction cosines as columns, size, pixel spacing) of one file."""
  reader = sitk.ImageFileReader()
  reader.SetFileName(str(path))
  try:
    reader.ReadImageInformation()
  except RuntimeError:
    raise DataError(f"{path}: {_NOT_AN_IMAGE}") from None
  for tag, what in (
    ("0020|0032", "ImagePositionPatient"),
    ("0020|0037", "ImageOrientationPatient"),
  ):
    if not reader.HasMetaDataKey(tag):
      raise DataError(f"{path}: no {what} ({tag.replace('|', ',')}); cannot place the slice")
  direction = np.asarray(reader.GetDirection(), np.float64).reshape(3, 3)
  return np.asarray(reader.GetOrigin()), direction, reader.GetSize()[:2], reader.GetSpacing()[:2]


def _check_stack(series: DicomSeries) -> None:
  """DataError unless the files form one regular, unsheared stack of at least 2 slices."""
  where = f"{series.folder}: series {series.series_uid}"
  if len(series.files) < 2:
    raise DataError(f"{where} has 1 slice; a volume needs 2 or more (one file per slice)")
  headers = [_slice_header(f) for f in series.files]
  _, direction, size, pixel = headers[0]
  for f, (_, d, s, _) in zip(series.files[1:], headers[1:]):
    if s != size or not np.allclose(d[:, :2], direction[:, :2], atol=1e-4):
      raise DataError(
        f"{f}: orientation or size differs from {series.files[0].name} in {where} "
        "(a localizer mixed in?)"
      )
  normal = np.cross(direction[:, 0], direction[:, 1])
  positions = np.stack([p for p, _, _, _ in headers])
  along = (positions - positions[0]) @ normal
  step = along[-1] / (len(along) - 1)
  if step < 1e-3 or np.abs(along - step * np.arange(len(along))).max() > _STEP_TOLERANCE * step:
    steps = np.diff(along)
    raise DataError(
      f"{where}: uneven slice spacing, steps from {steps.min():.3g} to {steps.max():.3g} mm "
      "along the slice normal (a missing or repeated slice?)"
    )
  shear = positions - positions[0] - along[:, None] * normal
  if np.linalg.norm(shear, axis=1).max() > _SHEAR_TOLERANCE * min(pixel):
    raise DataError(
      f"{where}: slices are not stacked along the slice normal (gantry tilt?); convert it with "
      "dcm2niix, which corrects tilt, and give the NIfTI file"
    )


def read_series(series: DicomSeries) -> nib.Nifti1Image:
  """The series as an in-memory NIfTI image, as SimpleITK's NIfTI writer would save it."""
  _check_stack(series)
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames([str(f) for f in series.files])
  # Positions passed _check_stack: ITK need not warn about rounding-level unevenness.
  reader.SetSpacingWarningRelThreshold(_STEP_TOLERANCE)
  try:
    image = reader.Execute()
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[-1]  # ITK's own reason; the lines above say where
    raise DataError(f"{series.folder}: cannot read series {series.series_uid}: {reason}") from None
  # SimpleITK arrays are (z, y, x); NIfTI voxel axes are (x, y, z) = (i, j, k).
  data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
  fits_int16 = data.min() >= -32768 and data.max() <= 32767
  data = data.astype(np.int16 if data.dtype.kind in "iu" and fits_int16 else np.float32)
  lps = np.eye(4)
  lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
  lps[:3, 3] = image.GetOrigin()
  affine = _LPS_TO_RAS @ lps
  nifti = nib.Nifti1Image(data, affine)
  nifti.set_sform(affine, code=1)
  nifti.set_qform(affine, code=1)
  nifti.header.set_xyzt_units("mm")
  return nifti
