"""Synthetic DICOM CT series with a known geometry, written with pydicom, for the DICOM tests."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

# ImageOrientationPatient (row cosines, column cosines) in DICOM's LPS world.
ORIENTATIONS = {
  "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
  "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
  "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ds(values) -> list[str]:
  # Decimal strings hold at most 16 characters: keep as many digits as fit.
  return [format_number_as_ds(float(v)) for v in values]


def write_series(
  folder: Path,
  volume: np.ndarray,
  *,
  spacing: Sequence[float] = (0.8, 0.7, 2.5),
  origin: Sequence[float] = (-20.0, 15.0, 100.0),
  orientation: str | Sequence[float] = "axial",
  slope: float = 1.0,
  intercept: float = -1024.0,
  series_uid: str | None = None,
  file_prefix: str = "",
  seed: int = 0,
) -> np.ndarray:
  """Write `volume` as a CT series of int16 slices in `folder`; return its nibabel affine.

  `volume[i, j, k]` is column i of row j of slice k, in Hounsfield units: the voxel order a
  DICOM-to-NIfTI converter (dcm2niix, SimpleITK) gives, so a reader of the series should return
  exactly `volume` with the returned affine (voxel indices to RAS+ mm).
  - spacing: (column, row, slice) spacing in mm; PixelSpacing is written as (row, column).
  - origin: ImagePositionPatient (LPS mm) of the first voxel of slice 0.
  - orientation: "axial", "coronal", "sagittal" or the six ImageOrientationPatient cosines;
    slice k lies at `origin + k * spacing[2] * (row x column)`.
  - slope, intercept: RescaleSlope/RescaleIntercept; `(volume - intercept) / slope` must be
    integers in the int16 range (ValueError otherwise).
  - series_uid: SeriesInstanceUID (derived from `seed` when None); two calls with one folder and
    one uid but different `file_prefix` put two stacks into one series (e.g. a localizer).
  Files are named `<file_prefix><n>.dcm` with n a shuffled (never the identity) permutation of the
  slice indices, so a reader must sort the slices by position, not by file name.
  """
  volume = np.asarray(volume)
  stored = (volume.astype(np.float64) - intercept) / slope
  if not np.array_equal(stored, np.round(stored)) or np.abs(stored).max() > 32767:
    raise ValueError("(volume - intercept) / slope must be int16 integers")
  iop = np.asarray(
    ORIENTATIONS[orientation] if isinstance(orientation, str) else orientation, np.float64
  )
  row, col = iop[:3], iop[3:]
  normal = np.cross(row, col)
  dx, dy, dz = map(float, spacing)
  origin = np.asarray(origin, np.float64)
  series_uid = series_uid or generate_uid(entropy_srcs=["series", str(seed)])
  study_uid = generate_uid(entropy_srcs=["study", str(seed)])
  frame_uid = generate_uid(entropy_srcs=["frame", str(seed)])
  n = volume.shape[2]
  rng = np.random.default_rng(seed)
  names = rng.permutation(n)
  if n > 1 and np.array_equal(names, np.arange(n)):
    names = names[::-1]

  folder.mkdir(parents=True, exist_ok=True)
  for k in range(n):
    sop_uid = generate_uid(entropy_srcs=[series_uid, file_prefix, str(k)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = "CT"
    ds.PatientID = "PHANTOM"
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = _ds(origin + k * dz * normal)
    ds.ImageOrientationPatient = _ds(iop)
    ds.PixelSpacing = _ds((dy, dx))
    ds.SliceThickness = format_number_as_ds(dz)
    ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = format_number_as_ds(slope)
    ds.RescaleIntercept = format_number_as_ds(intercept)
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()
    ds.save_as(folder / f"{file_prefix}{names[k]:04d}.dcm", enforce_file_format=True)

  lps = np.eye(4)
  lps[:3, :3] = np.stack([row * dx, col * dy, normal * dz], axis=1)
  lps[:3, 3] = origin
  return _LPS_TO_RAS @ lps


def set_tag(path: Path, keyword: str, value=None) -> None:
  """Change one header element of a written file in place (delete it when `value` is None)."""
  ds = pydicom.dcmread(path)
  if value is None:
    delattr(ds, keyword)
  else:
    setattr(ds, keyword, value)
  ds.save_as(path, enforce_file_format=True)


def slice_file(folder: Path, index: int, file_prefix: str = "") -> Path:
  """The file of slice `index` (0-based, InstanceNumber - 1) in a folder `write_series` wrote."""
  for path in sorted(folder.glob(f"{file_prefix}*.dcm")):
    if pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber == index + 1:
      return path
  raise FileNotFoundError(f"no slice {index} in {folder}")
