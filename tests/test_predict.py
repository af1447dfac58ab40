"""Prediction: original geometry and header kept (NIfTI and DICOM), a perfect model round-trips,
fold ensembles, postprocessing, background preprocessing, bad files skipped, write failures."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from tests.conftest import make_tiny_config
from tests.dicom_series import write_series
from vnet_jax import checkpoint, postprocessing, predict, train
from vnet_jax.data import dicom, layouts, preprocess, synthetic
from vnet_jax.data.cache import prepare_dataset
from vnet_jax.data.geometry import ras_zyx
from vnet_jax.data.plan import PreprocessSettings
from vnet_jax.errors import CheckpointError, ConfigError, DataError, WriteError
from vnet_jax.model import build_model

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ a perfect model, no JAX

# HU of each class in the phantom: after the plan's CT window and z-scoring every class has its
# own value, so a voxel-wise classifier of the preprocessed image is a perfect model.
CLASS_HU = {0: 40, 1: 100, 2: 200}  # body (background) 40 HU, in air of -1000 HU
CT = {"clip": [-200.0, 300.0], "mean": 40.0, "std": 80.0}
TARGET_ZYX = (2.5, 0.8, 0.7)  # mm: every test volume is at this spacing, so nothing is resampled
SETTINGS = predict.InferenceSettings(window=(4, 8, 8), overlap=0.5)


def make_plan(target_spacing=TARGET_ZYX) -> dict:
  return {
    "num_channels": 1,
    "channel_names": ["CT"],
    "normalization": [{"channel": 0, "name": "CT", "scheme": "ct", **CT}],
    "crop_to_nonzero": True,
    "ct_body_threshold": -500.0,
    "target_spacing": list(target_spacing),
    "class_names": {"0": "background", "1": "liver", "2": "spleen"},
    "num_classes": 3,
    "label_lut": list(range(256)),
  }


def perfect_run_group(windows: np.ndarray) -> np.ndarray:
  """One-hot of the class whose normalised HU is nearest each voxel (window padding -> body)."""
  centres = (np.array([-1000, *CLASS_HU.values()], np.float32).clip(*CT["clip"]) - 40) / 80
  classes = np.array([0, *CLASS_HU])
  nearest = np.abs(windows[..., :1] - centres).argmin(-1)
  return np.eye(3, dtype=np.float32)[classes[nearest]]


def phantom(shape=(20, 16, 12), second_components=False):
  """(HU int16, labels uint8) in voxel space: a body with two organs, air around it."""
  idx = np.indices(shape, np.float64)
  c = [(s - 1) / 2 for s in shape]
  r = lambda centre, radii: sum(((idx[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
  labels = np.zeros(shape, np.uint8)
  labels[r([c[0] - 3, c[1], c[2]], (3.5, 3, 3)) < 1] = 1
  labels[r([c[0] + 4, c[1] + 1, c[2] - 1], (2, 2.5, 2.5)) < 1] = 2
  if second_components:  # small extra blobs, apart from the big ones
    labels[r([c[0] - 1, c[1] - 5, c[2] + 3], (1, 1, 1)) < 1.5] = 1
    labels[r([c[0] + 5, c[1] + 5, c[2] + 3], (1, 1, 1)) < 1.5] = 2
  body = r(c, [0.42 * s for s in shape]) < 1
  hu = np.where(body, CLASS_HU[0], -1000)
  for cls in (1, 2):
    hu[labels == cls] = CLASS_HU[cls]
  return hu.astype(np.int16), labels


def perfect_predictor(**kwargs) -> predict.Predictor:
  return predict.Predictor(
    make_plan(), make_plan()["class_names"], SETTINGS, perfect_run_group, **kwargs
  )


def write_nifti_case(path: Path, second_components=False) -> np.ndarray:
  """A case at TARGET_ZYX spacing in a non-RAS orientation; returns its labels."""
  hu, labels = phantom(second_components=second_components)
  z, y, x = TARGET_ZYX
  affine = np.array([[-x, 0, 0, 10.0], [0, 0, -y, 5.0], [0, z, 0, -20.0], [0, 0, 0, 1]])
  nib.save(nib.Nifti1Image(hu, affine), str(path))
  return labels


def test_a_dicom_tree_is_predicted_per_series_in_each_series_geometry(tmp_path):
  # A coronal and a sagittal series, spaced so that both are TARGET_ZYX after reorientation.
  z, y, x = TARGET_ZYX
  spacings = {"coronal": (x, z, y), "sagittal": (y, z, x)}
  truth = {}
  for k, (orientation, spacing) in enumerate(spacings.items()):
    hu, labels = phantom()
    affine = write_series(
      tmp_path / "tree" / "patient" / orientation,
      hu,
      spacing=spacing,
      orientation=orientation,
      seed=k,
    )
    assert nib.aff2axcodes(affine)[2] != "S"  # not axial
    assert ras_zyx(affine, hu.shape, spacing)[0] == pytest.approx(TARGET_ZYX)
    truth[orientation] = labels
  errors = predict.predict_path(perfect_predictor(), tmp_path / "tree", tmp_path / "out", "none")
  assert errors == []
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
    "coronal.nii.gz",
    "sagittal.nii.gz",
  ]
  for series in dicom.find_series(tmp_path / "tree"):
    image = dicom.read_series(series)
    out = nib.load(tmp_path / "out" / f"{series.name}.nii.gz")
    assert out.shape == image.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, image.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.dataobj), truth[series.name])


def test_in_memory_images_are_checked_like_files_and_errors_name_their_source(tmp_path):
  hu, _ = phantom()
  affine = np.diag([0.7, 0.8, 2.5, 1.0])
  nib.save(nib.Nifti1Image(hu, affine), tmp_path / "a.nii.gz")
  from_file, _ = preprocess.preprocess_image([tmp_path / "a.nii.gz"], make_plan())
  source = tmp_path / "series1"
  image, meta = preprocess.preprocess_image([nib.Nifti1Image(hu, affine)], make_plan(), source)
  np.testing.assert_array_equal(image, from_file)
  assert meta["image_files"] == [str(source)]
  nan = hu.astype(np.float32)
  nan[3, 4, 5] = np.nan
  for data, reason in (
    (nan, r"1 NaN/inf intensity value\(s\)$"),
    (np.stack([hu, hu], -1), "4D image with 2 volumes"),
  ):
    with pytest.raises(DataError, match=f"^{re.escape(str(source))}: {reason}"):
      preprocess.preprocess_image([nib.Nifti1Image(data, affine)], make_plan(), source)


def test_a_write_failure_stops_the_run_with_one_line_and_loses_nothing(tmp_path, monkeypatch):
  inputs, out = tmp_path / "in", tmp_path / "out"
  inputs.mkdir()
  out.mkdir()
  for name in ("a", "b"):
    write_nifti_case(inputs / f"{name}.nii.gz")
  earlier = out / "a.nii.gz"
  earlier.write_bytes(b"an earlier prediction")

  def full_disk(path, *args, **kwargs):
    Path(path).write_bytes(b"half a file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(preprocess, "write_labels_nifti", full_disk)
  predictor = perfect_predictor()
  with pytest.raises(WriteError) as e:
    predict.predict_path(predictor, inputs, out, "none", progress=False)
  assert str(e.value) == f"{earlier}: cannot write (No space left on device)"
  assert [p.name for p in out.iterdir()] == ["a.nii.gz"]  # no partial or temporary file
  assert earlier.read_bytes() == b"an earlier prediction"
  assert len(predictor.stage_seconds["sliding_window"]) == 1  # b was never predicted

  blocked = tmp_path / "a_file"
  blocked.write_text("")
  with pytest.raises(DataError, match=f"^{re.escape(str(blocked / 'out'))}: cannot create the "):
    predict.predict_path(predictor, inputs, blocked / "out", "none")


def test_a_predictor_needs_exactly_one_of_workdir_and_model():
  for workdir, model, given in ((None, None, "neither"), ("runs/x", "model.zip", "both")):
    with pytest.raises(ConfigError, match=f"^--workdir / --model: {given} given; "):
      predict.load_predictor(workdir, model)
  # A model file holds the checkpoints it was exported from: --checkpoint would be ignored.
  with pytest.raises(ConfigError, match="^--checkpoint=latest: goes with --workdir; model.zip "):
    predict.load_predictor(None, "model.zip", "latest")


def test_postprocessing_auto_none_and_largest(tmp_path, capsys):
  inputs = tmp_path / "in"
  inputs.mkdir()
  labels = write_nifti_case(inputs / "case.nii.gz", second_components=True)
  exp = tmp_path / "exp"
  postprocessing.write_decision(
    {"connectivity": 26, "classes": {"1": {"applied": True}, "2": {"applied": False}}}, exp
  )
  predictor = perfect_predictor(workdirs=[exp / "fold0"])
  read = lambda mode: np.asarray(nib.load(tmp_path / mode / "case.nii.gz").dataobj)
  for mode in ("none", "auto", "largest"):
    assert predict.predict_path(predictor, inputs, tmp_path / mode, mode, progress=False) == []
  np.testing.assert_array_equal(read("none"), labels)
  expected = postprocessing.keep_largest_component(labels, [1])
  assert not np.array_equal(expected, labels)
  np.testing.assert_array_equal(read("auto"), expected)
  np.testing.assert_array_equal(
    read("largest"), postprocessing.keep_largest_component(labels, [1, 2])
  )
  assert not np.array_equal(read("largest"), expected)
  assert f"classes [1], as {exp / 'postprocessing.json'} decided" in capsys.readouterr().out
  # Without a decision file, auto does nothing.
  alone = perfect_predictor(workdirs=[tmp_path / "other" / "fold0"])
  predict.predict_path(alone, inputs, tmp_path / "alone", "auto", progress=False)
  np.testing.assert_array_equal(read("alone"), labels)
  assert "postprocessing: none" in capsys.readouterr().out
  # A model file's recorded decision: no workdirs to look in.
  recorded = perfect_predictor(decision=([2], "as recorded in model.zip"))
  predict.predict_path(recorded, inputs, tmp_path / "recorded", "auto", progress=False)
  np.testing.assert_array_equal(
    read("recorded"), postprocessing.keep_largest_component(labels, [2])
  )
  assert "classes [2], as recorded in model.zip" in capsys.readouterr().out


def test_the_next_case_is_preprocessed_in_the_background_and_errors_stay_with_their_case(
  tmp_path, capsys
):
  inputs = tmp_path / "in"
  inputs.mkdir()
  for name in ("a", "c"):
    write_nifti_case(inputs / f"{name}.nii.gz")
  (inputs / "b.nii.gz").write_bytes((inputs / "a.nii.gz").read_bytes()[:200])
  predictor = perfect_predictor()
  prepare, segment = predictor.prepare, predictor.segment
  started = {}
  threads = set()

  def recording_prepare(case):
    threads.add(threading.current_thread() is threading.main_thread())
    started[case.name] = threading.Event()
    started[case.name].set()
    return prepare(case)

  waited = []

  def waiting_segment(prepared, classes):
    # With one case read ahead, the next case's preprocessing starts while this one runs.
    following = {"a": "b", "b": "c"}.get(prepared.case.name)
    if following:
      for _ in range(500):
        if following in started:
          break
        threading.Event().wait(0.01)
      waited.append(following in started)
    return segment(prepared, classes)

  predictor.prepare, predictor.segment = recording_prepare, waiting_segment
  errors = predict.predict_path(predictor, inputs, tmp_path / "out", "none")
  assert waited == [True] and threads == {False}
  assert len(errors) == 1 and errors[0].startswith(f"{inputs / 'b.nii.gz'}: ")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "c.nii.gz"]
  captured = capsys.readouterr()
  assert "[2/3] error: " in captured.err and "3/3" in captured.err  # the progress bar
  assert [line.split(":")[0] for line in captured.out.splitlines() if line.startswith("[")] == [
    "[1/3] a",
    "[3/3] c",
  ]


# ----------------------------------------------------------------------- a trained tiny run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset):
  work = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(make_tiny_config(tiny_dataset, work / "cache"), work / "w")
  return work / "w"


@pytest.mark.slow
def test_predictions_have_the_input_shape_affine_and_header_codes(
  trained_run, tiny_dataset, tmp_path
):
  predictor = predict.Predictor.from_workdirs(trained_run, which="latest")
  errors = predict.predict_path(predictor, tiny_dataset / "images", tmp_path / "out")
  assert errors == []
  inputs = sorted((tiny_dataset / "images").glob("*.nii.gz"))
  for image_file in inputs:
    case_id = image_file.name[: -len("_0000.nii.gz")]
    src, out = nib.load(image_file), nib.load(tmp_path / "out" / f"{case_id}.nii.gz")
    assert out.shape == src.shape
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, src.affine)
    np.testing.assert_array_equal(out.header.get_sform(), src.header.get_sform())
    np.testing.assert_array_equal(out.header.get_qform(), src.header.get_qform())
    assert int(out.header["sform_code"]) == int(src.header["sform_code"])
    assert int(out.header["qform_code"]) == int(src.header["qform_code"])
    assert np.asarray(out.dataobj).max() <= 13


@pytest.mark.slow
def test_an_experiment_directory_is_an_ensemble_of_its_folds(trained_run, tiny_dataset, tmp_path):
  exp = tmp_path / "exp"
  for fold in ("fold0", "fold1"):
    shutil.copytree(trained_run, exp / fold)
  (exp / "fold2").mkdir()  # a fold not trained yet
  ensemble = predict.Predictor.from_workdirs(exp, which="latest")
  single = predict.Predictor.from_workdirs(trained_run, which="latest")
  assert ensemble.workdirs == (exp / "fold0", exp / "fold1")
  assert ensemble.steps == single.steps * 2
  case = predict.discover_inputs(tiny_dataset / "images")[0]
  image = single.prepare(case).image
  # Two copies of one fold: their average is that fold's prediction.
  np.testing.assert_allclose(
    ensemble.window.predict_probabilities(image, np.float32),
    single.window.predict_probabilities(image, np.float32),
    atol=1e-5,
  )


def test_a_perfect_model_returns_the_reference_exactly_in_original_geometry(tmp_path):
  # One spacing for all cases, so the median target spacing means no resampling; the orientations
  # differ (non-RAS cases) and the body crop applies, which must all be undone exactly.
  data = tmp_path / "data"
  synthetic.write_dataset(data, 3, shape=(40, 36, 10), spacing=(0.8, 0.8, 3.0))
  dataset = layouts.discover_dataset(data)
  cache = prepare_dataset(
    dataset, PreprocessSettings(), tmp_path / "cache", num_workers=0, progress=False
  )
  assert {nib.aff2axcodes(nib.load(c.label_file).affine) for c in dataset.cases} != {
    ("R", "A", "S")
  }
  for case in dataset.cases:
    image, meta = preprocess.preprocess_image(case.image_files, cache.plan)
    _, label = cache.load_case(case.case_id)
    assert image.shape[:3] == label.shape
    probs = np.eye(cache.num_classes, dtype=np.float16)[np.asarray(label)]
    restored = preprocess.probabilities_to_original(probs, meta)
    reference = np.asarray(nib.load(case.label_file).dataobj)
    np.testing.assert_array_equal(restored, reference)


@pytest.mark.slow
def test_cli_reports_a_bad_file_on_one_line_and_predicts_the_others(
  trained_run, tiny_dataset, tmp_path
):
  inputs = tmp_path / "in"
  inputs.mkdir()
  good = sorted((tiny_dataset / "images").glob("*.nii.gz"))[:2]
  for f in good:
    shutil.copy(f, inputs / f.name)
  bad = inputs / "broken_0000.nii.gz"
  bad.write_bytes(good[0].read_bytes()[:200])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "vnet_jax.predict",
      f"--workdir={trained_run}",
      f"--input={inputs}",
      f"--output={tmp_path / 'out'}",
      "--checkpoint=latest",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert out.returncode == 1
  error_lines = [line for line in out.stderr.splitlines() if "broken_0000.nii.gz" in line]
  assert len(error_lines) == 1 and "Traceback" not in out.stderr
  assert "3/3" in out.stderr  # the progress bar
  written = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
  assert written == sorted(f.name.replace("_0000", "") for f in good)


@pytest.mark.slow
def test_unknown_workdir_or_checkpoint_is_a_clear_error(trained_run, tmp_path):
  with pytest.raises(DataError, match="config.json"):
    predict.Predictor.from_workdirs(tmp_path)
  with pytest.raises(CheckpointError, match="step 999"):
    predict.Predictor.from_workdirs(trained_run, which="999")


@pytest.mark.slow
def test_prediction_imports_neither_training_nor_optax_nor_matplotlib_nor_jax():
  # JAX comes with a JAX model only (`Predictor.from_workdirs`, model.zip), not with the module.
  code = (
    "import sys, vnet_jax.predict\n"
    "bad = [m for m in sys.modules if m.split('.')[0] in ('optax', 'matplotlib', 'jax')\n"
    "       or m in ('vnet_jax.train', 'vnet_jax.report')]\n"
    "print(bad)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_loads_the_trained_weights_without_the_optimizer_state(trained_run):
  config = make_tiny_config("", "")
  model = build_model(config, 14, 1)
  # One manager per way of reading: Orbax ties an item to the first handler that read it.
  manager = checkpoint.make_manager(trained_run, read_only=True)
  state = jax.eval_shape(lambda: train.create_train_state(config, model))
  full = checkpoint.restore(manager, manager.latest_step(), state)
  template = {"params": full.params, "batch_stats": full.batch_stats}
  step, variables = checkpoint.load_variables(
    trained_run, "latest", jax.eval_shape(lambda: template)
  )
  assert step == manager.latest_step()
  assert set(variables) == {"params", "batch_stats"}
  leaves = jax.tree_util.tree_leaves_with_path(variables)
  assert len(leaves) == len(jax.tree_util.tree_leaves(template))
  for (path, restored), saved in zip(leaves, jax.tree_util.tree_leaves(template), strict=True):
    np.testing.assert_array_equal(restored, saved, err_msg=str(path))


@pytest.mark.slow
def test_tta_follows_the_run_config_unless_the_command_line_says(trained_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(trained_run, run)
  config = json.loads((run / "config.json").read_text())
  for configured in (False, True):
    config["inference"]["tta"] = configured
    (run / "config.json").write_text(json.dumps(config))
    assert predict.Predictor.from_workdirs(run, which="latest").settings.tta is configured
    for given in (False, True):
      assert predict.Predictor.from_workdirs(run, which="latest", tta=given).settings.tta is given
