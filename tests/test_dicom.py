"""DICOM series input: discovery, reading into NIfTI geometry, and the one-line errors."""

import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from tests.dicom_series import set_tag, slice_file, write_series
from vnet_jax.data import dicom
from vnet_jax.errors import DataError

# (columns, rows, slices): every axis a different length, so a transposed read cannot match.
SHAPE = (7, 6, 5)
OBLIQUE = (0.6, 0.8, 0.0, 0.0, 0.0, -1.0)  # rows in the axial plane, columns head to feet


def hu_volume(seed=0, shape=SHAPE):
  return np.random.default_rng(seed).integers(-1024, 2000, shape).astype(np.int16)


def only_series(path):
  (series,) = dicom.find_series(path)
  return series


def one_line_error(fn, *args) -> str:
  with pytest.raises(DataError) as e:
    fn(*args)
  message = str(e.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal", OBLIQUE])
def test_read_series_gives_the_written_voxels_and_geometry(tmp_path, orientation):
  volume = hu_volume()
  expected = write_series(tmp_path / "ct", volume, spacing=(0.8, 0.7, 2.5), orientation=orientation)
  series = only_series(tmp_path / "ct")
  assert (series.name, series.folder, len(series.files)) == ("ct", tmp_path / "ct", SHAPE[2])

  image = dicom.read_series(series)

  assert image.get_data_dtype() == np.int16
  np.testing.assert_array_equal(np.asarray(image.dataobj), volume)
  np.testing.assert_allclose(image.affine, expected, atol=1e-6)
  for affine, code in (image.header.get_sform(coded=True), image.header.get_qform(coded=True)):
    assert code == 1
    np.testing.assert_allclose(affine, expected, atol=1e-6)


@pytest.mark.parametrize(
  "orientation, slope, intercept, dtype",
  [("axial", 1.0, -1024.0, np.int16), ("sagittal", 0.5, -1000.5, np.float32)],
)
def test_read_series_equals_simpleitk_nifti_writer(tmp_path, orientation, slope, intercept, dtype):
  volume = hu_volume() * slope  # representable as (stored * slope + intercept)
  volume = volume + (intercept - np.floor(intercept))
  write_series(tmp_path / "ct", volume, orientation=orientation, slope=slope, intercept=intercept)
  series = only_series(tmp_path / "ct")
  sitk.WriteImage(sitk.ReadImage([str(f) for f in series.files]), str(tmp_path / "sitk.nii.gz"))
  reference = nib.load(tmp_path / "sitk.nii.gz")

  image = dicom.read_series(series)

  assert image.get_data_dtype() == dtype
  np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(reference.dataobj))
  np.testing.assert_array_equal(np.asarray(image.dataobj, np.float64), volume)
  # SimpleITK stores the affine in float32.
  np.testing.assert_allclose(image.affine, reference.affine, atol=1e-5)
  ours, theirs = image.header, reference.header
  assert ours.get_sform(coded=True)[1] == theirs.get_sform(coded=True)[1] == 1
  assert ours.get_qform(coded=True)[1] == theirs.get_qform(coded=True)[1] == 1
  np.testing.assert_allclose(ours.get_qform(), theirs.get_qform(), atol=1e-5)
  assert ours.get_xyzt_units()[0] == theirs.get_xyzt_units()[0] == "mm"


def test_two_series_in_one_folder_are_found_separately(tmp_path):
  a, b = hu_volume(1), hu_volume(2, shape=(7, 6, 3))
  write_series(tmp_path, a, series_uid="1.2.3.2", file_prefix="a")
  write_series(tmp_path, b, series_uid="1.2.3.10", file_prefix="b", orientation="coronal")

  series = dicom.find_series(tmp_path)

  # The folder holds two series, so each is named by its UID; sorted by name.
  assert [s.name for s in series] == ["1.2.3.10", "1.2.3.2"]
  assert [s.series_uid for s in series] == ["1.2.3.10", "1.2.3.2"]
  assert {f.name[0] for f in series[0].files} == {"b"}
  np.testing.assert_array_equal(np.asarray(dicom.read_series(series[0]).dataobj), b)
  np.testing.assert_array_equal(np.asarray(dicom.read_series(series[1]).dataobj), a)
  # A single file stands for its series, named as when its folder is given.
  assert dicom.find_series(series[1].files[0]) == [series[1]]


def test_a_tree_of_series(tmp_path, caplog, capfd):
  root = tmp_path / "study"
  volumes = {"1.2.7.1": hu_volume(1), "1.2.7.2": hu_volume(2), "ct": hu_volume(3)}
  write_series(root / "p1" / "series", volumes["1.2.7.1"], series_uid="1.2.7.1")
  write_series(root / "p2" / "series", volumes["1.2.7.2"], series_uid="1.2.7.2")
  write_series(root / "p3" / "ct", volumes["ct"], series_uid="1.2.7.3")
  (root / "p3" / "ct" / "notes.txt").write_text("not DICOM")
  damaged = root / "p3" / "other" / "damaged.dcm"
  damaged.parent.mkdir()
  damaged.write_bytes(slice_file(root / "p3" / "ct", 0).read_bytes()[:400])
  (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # an index, not an image: not reported

  assert dicom.is_dicom_path(root)
  with caplog.at_level(logging.WARNING):
    series = dicom.find_series(root)

  # Two folders share the name "series": those two are named by UID, "ct" by its folder.
  assert [s.name for s in series] == ["1.2.7.1", "1.2.7.2", "ct"]
  for s in series:
    np.testing.assert_array_equal(np.asarray(dicom.read_series(s).dataobj), volumes[s.name])
  assert str(damaged) in caplog.text and "DICOMDIR" not in caplog.text
  # The folder of only a damaged file is reported once, by name, not by ITK's warnings.
  assert "WARNING" not in capfd.readouterr().err


def test_rounded_slice_positions_are_read_quietly(tmp_path, capfd):
  volume = hu_volume()
  expected = write_series(tmp_path, volume, spacing=(0.8, 0.7, 2.5))
  # Scanners round positions: slice 2 sits 0.05 mm (2% of the step) off the regular stack.
  set_tag(slice_file(tmp_path, 2), "ImagePositionPatient", [-20.0, 15.0, 105.05])

  image = dicom.read_series(only_series(tmp_path))

  np.testing.assert_array_equal(np.asarray(image.dataobj), volume)
  np.testing.assert_allclose(image.affine, expected, atol=1e-6)
  assert "WARNING" not in capfd.readouterr().err


def test_series_names_stay_unique(tmp_path):
  # "a/s" and "b/s" fall back to their UIDs, and folder "1.2.8.1" would take the first UID.
  write_series(tmp_path / "a" / "s", hu_volume(), series_uid="1.2.8.1")
  write_series(tmp_path / "b" / "s", hu_volume(), series_uid="1.2.8.2")
  write_series(tmp_path / "1.2.8.1", hu_volume(), series_uid="1.2.8.3")
  assert [s.name for s in dicom.find_series(tmp_path)] == ["1.2.8.1", "1.2.8.2", "1.2.8.3"]


def test_is_dicom_path(tmp_path):
  write_series(tmp_path / "ct", hu_volume())
  nifti = tmp_path / "nifti"
  nifti.mkdir()
  nib.save(nib.Nifti1Image(hu_volume(), np.eye(4)), nifti / "case_0000.nii.gz")
  (tmp_path / "empty").mkdir()

  assert dicom.is_dicom_path(tmp_path / "ct")
  assert dicom.is_dicom_path(slice_file(tmp_path / "ct", 0))
  assert not dicom.is_dicom_path(nifti)
  assert not dicom.is_dicom_path(nifti / "case_0000.nii.gz")
  assert not dicom.is_dicom_path(tmp_path / "empty")
  assert not dicom.is_dicom_path(tmp_path / "missing")
  message = one_line_error(dicom.is_dicom_path, tmp_path)
  assert "both DICOM" in message and "case_0000.nii.gz" in message


def test_find_series_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  assert "no DICOM files" in one_line_error(dicom.find_series, tmp_path / "empty")
  assert "no such file" in one_line_error(dicom.find_series, tmp_path / "missing")
  write_series(tmp_path / "a", hu_volume(), series_uid="1.2.9")
  write_series(tmp_path / "b", hu_volume(), series_uid="1.2.9")
  assert "split across" in one_line_error(dicom.find_series, tmp_path)
  damaged = tmp_path / "damaged.dcm"
  damaged.write_bytes(slice_file(tmp_path / "a", 0).read_bytes()[:400])
  message = one_line_error(dicom.find_series, damaged)
  assert str(damaged) in message and "not a DICOM image" in message


def _drop_middle_slice(folder):
  slice_file(folder, 2).unlink()


def _add_localizer(folder):
  write_series(folder, hu_volume(shape=(7, 6, 1)), orientation="sagittal", file_prefix="loc")


def _tilt(folder):
  for k in range(SHAPE[2]):  # slices shifted 1 mm in-plane per slice: a 22 degree tilt
    set_tag(slice_file(folder, k), "ImagePositionPatient", [-20.0, 15.0 + k, 100.0 + 2.5 * k])


@pytest.mark.parametrize(
  "damage, reason, names_file",
  [
    (_drop_middle_slice, "uneven slice spacing", False),
    (_add_localizer, "localizer", True),
    (_tilt, "gantry tilt", False),
    (lambda f: set_tag(slice_file(f, 1), "ImageOrientationPatient"), "no ImageOrientation", True),
    (lambda f: set_tag(slice_file(f, 3), "ImagePositionPatient"), "no ImagePosition", True),
  ],
)
def test_read_series_refuses_an_irregular_stack(tmp_path, damage, reason, names_file):
  folder = tmp_path / "ct"
  write_series(folder, hu_volume())
  damage(folder)
  series = only_series(folder)

  message = one_line_error(dicom.read_series, series)

  assert reason in message and str(folder) in message
  if names_file:
    assert any(str(f) in message for f in series.files)


def test_read_series_refuses_a_single_slice(tmp_path):
  write_series(tmp_path, hu_volume(shape=(7, 6, 1)))
  message = one_line_error(dicom.read_series, only_series(tmp_path))
  assert str(tmp_path) in message and "needs 2 or more" in message


def test_read_series_names_an_unreadable_file(tmp_path, monkeypatch):
  write_series(tmp_path, hu_volume())
  series = only_series(tmp_path)
  good = series.files[1].read_bytes()
  series.files[1].write_bytes(good[:400])  # damaged after discovery
  message = one_line_error(dicom.read_series, series)
  assert str(series.files[1]) in message and "not a DICOM image" in message

  series.files[1].write_bytes(good)

  def execute(self):
    raise RuntimeError(
      "Exception thrown in ImageSeriesReader_Execute: x.cxx:9:\nsitk::ERROR: no memory"
    )

  monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", execute)
  message = one_line_error(dicom.read_series, series)
  assert str(tmp_path) in message and message.endswith("sitk::ERROR: no memory")
