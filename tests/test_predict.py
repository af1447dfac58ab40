"""Prediction: original geometry and header kept, a perfect model round-trips, bad files
are skipped."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from tests.conftest import make_tiny_config
from vnet_jax import checkpoint, predict, train
from vnet_jax.data import layouts, preprocess, synthetic
from vnet_jax.data.cache import prepare_dataset
from vnet_jax.data.plan import PreprocessSettings
from vnet_jax.errors import DataError
from vnet_jax.model import build_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset):
  work = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(make_tiny_config(tiny_dataset, work / "cache"), work / "w")
  return work / "w"


@pytest.mark.slow
def test_predictions_have_the_input_shape_affine_and_header_codes(
  trained_run, tiny_dataset, tmp_path
):
  errors = predict.predict_path(
    trained_run, tiny_dataset / "images", tmp_path / "out", which="latest"
  )
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
  written = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
  assert written == sorted(f.name.replace("_0000", "") for f in good)


@pytest.mark.slow
def test_unknown_workdir_or_checkpoint_is_a_clear_error(trained_run, tmp_path):
  with pytest.raises(DataError, match="config.json"):
    predict.Predictor(tmp_path)
  from vnet_jax.errors import CheckpointError

  with pytest.raises(CheckpointError, match="step 999"):
    predict.Predictor(trained_run, which="999")


@pytest.mark.slow
def test_prediction_imports_neither_training_nor_optax_nor_matplotlib():
  code = (
    "import sys, vnet_jax.predict\n"
    "bad = [m for m in sys.modules if m.split('.')[0] in ('optax', 'matplotlib')\n"
    "       or m in ('vnet_jax.train', 'vnet_jax.report')]\n"
    "print(bad)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_restores_the_trained_weights_without_the_optimizer_state(trained_run):
  config = predict.Predictor(trained_run, which="latest").config
  model = build_model(config, 14, 1)
  # One manager per way of reading: Orbax ties an item to the first handler that read it.
  manager = checkpoint.make_manager(trained_run, read_only=True)
  step = manager.latest_step()
  state = jax.eval_shape(lambda: train.create_train_state(config, model))
  full = checkpoint.restore(manager, step, state)
  template = {"params": full.params, "batch_stats": full.batch_stats}
  variables = checkpoint.restore_variables(
    checkpoint.make_manager(trained_run, read_only=True), step, jax.eval_shape(lambda: template)
  )
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
    assert predict.Predictor(run, which="latest").window.tta is configured
    for given in (False, True):
      assert predict.Predictor(run, which="latest", tta=given).window.tta is given
