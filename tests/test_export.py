"""One-file exports: model.zip runs the checkpoints' network exactly, model.onnx matches it, both
predict scans as the workdirs do (postprocessing decision included), and damaged files or
mismatched folds are refused on one line."""

import itertools
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import optax
import pytest

from tests import nifti_cases
from tests.conftest import make_tiny_config, run_module, subprocess_env
from vnet_jax import checkpoint, export, postprocessing, predict, train
from vnet_jax.errors import ConfigError, DataError, WriteError
from vnet_jax.exported_model import ModelInfo, load_model_zip, load_onnx, onnx_metadata_path
from vnet_jax.files import write_json_atomic
from vnet_jax.model import build_model
from vnet_jax.trained_runs import InferenceSettings

PLAN = {
  "num_channels": 1,
  "channel_names": ["CT"],
  "target_spacing": [4.0, 2.0, 2.0],
  "normalization": [{"scheme": "zscore"}],
  "crop_to_nonzero": True,
  "class_names": {"0": "background", "1": "liver", "2": "spleen"},
}
STEP = 2
# The experiment's postprocessing decision: keep the largest component of class 1 only.
DECISION = {"connectivity": 26, "classes": {"1": {"applied": True}, "2": {"applied": False}}}
# Not the defaults, so settings that were not taken from the run's config show.
CONFIG = make_tiny_config(
  "data", "cache", inference__overlap=0.25, inference__tta=True, inference__windows_per_device=2
)


def _inference_model():
  return build_model(CONFIG, len(PLAN["class_names"]), 1).clone(deep_supervision=False)


def _make_fold(workdir, seed: int) -> dict:
  """A workdir as training leaves it, with random weights and BatchNorm statistics (a trained
  network's statistics are far from init's 0 and 1); returns its variables."""
  write_json_atomic(workdir / "config.json", json.loads(CONFIG.to_json_best_effort()))
  write_json_atomic(workdir / "plan.json", PLAN)
  model = build_model(CONFIG, len(PLAN["class_names"]), 1)
  x = jax.ShapeDtypeStruct((1, *CONFIG.patch_size, 1), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    value = rng.normal(0.0, 0.3, s.shape).astype(s.dtype)
    return np.abs(value) + 0.5 if path[-1].key == "var" else value

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  state = train.TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    tx=optax.adam(1e-3),
    batch_stats=variables["batch_stats"],
    rng=jax.random.PRNGKey(seed),
  )
  manager = checkpoint.make_manager(workdir)
  checkpoint.save(manager, STEP, state)
  manager.wait_until_finished()
  return variables


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
  """An experiment directory with two folds of different weights and a postprocessing
  decision: (its path, each fold's workdir and variables)."""
  exp = tmp_path_factory.mktemp("exp")
  made = []
  for i in range(2):
    (exp / f"fold{i}").mkdir()
    made.append((exp / f"fold{i}", _make_fold(exp / f"fold{i}", seed=i)))
  postprocessing.write_decision(DECISION, exp)
  return exp, made


@pytest.fixture(scope="module")
def model_zip(folds, tmp_path_factory):
  path = tmp_path_factory.mktemp("zip") / "model.zip"
  export.write_model_zip([w for w, _ in folds[1]], path, which="latest")
  return path


@pytest.fixture(scope="module")
def onnx_model(folds, tmp_path_factory):
  """Fold 0 as model.onnx (+ model.json)."""
  path = tmp_path_factory.mktemp("onnx") / "model.onnx"
  export.write_onnx(folds[1][0][0], path, which="latest")
  return path


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
  """A folder with one CT-like scan, neither RAS nor in (x, y, z) order."""
  folder = tmp_path_factory.mktemp("scan")
  image, _ = nifti_cases.synth()
  nib.save(nib.Nifti1Image(image, nifti_cases.AFFINE), str(folder / "case_0000.nii.gz"))
  return folder


def _windows(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, *CONFIG.patch_size, 1)).astype(np.float32)


def test_zip_network_is_bit_exact_for_each_fold_and_any_window_count(folds, model_zip):
  loaded = load_model_zip(model_zip)
  reference = jax.jit(lambda v, x: _inference_model().apply(v, x, train=False))
  # Two window counts through one file: the batch dimension is symbolic.
  for (_, variables), fold_variables, n in zip(folds[1], loaded.fold_variables, (2, 3)):
    x = _windows(n, seed=n)
    logits = np.asarray(jax.jit(loaded.apply_fn)(fold_variables, x))
    assert logits.shape == (n, *CONFIG.patch_size, 3) and logits.dtype == np.float32
    assert np.array_equal(logits, np.asarray(reference(variables, x)))


def test_zip_holds_every_fold_in_order_with_plan_and_settings(folds, model_zip):
  loaded = load_model_zip(model_zip)
  assert len(loaded.fold_variables) == 2
  for (_, variables), fold_variables in zip(folds[1], loaded.fold_variables):
    flat, tree = jax.tree_util.tree_flatten(variables)
    got, got_tree = jax.tree_util.tree_flatten(fold_variables)
    assert got_tree == tree and all(np.array_equal(a, b) for a, b in zip(got, flat))
  assert loaded.workdirs == tuple(str(w) for w, _ in folds[1]) and loaded.steps == (STEP, STEP)
  assert loaded.plan == PLAN
  assert loaded.class_names == {0: "background", 1: "liver", 2: "spleen"}
  assert loaded.settings == InferenceSettings(tuple(CONFIG.patch_size), 0.25, True, 2)
  assert loaded.postprocess_classes == (1,)
  assert loaded.platforms == ("cpu", "cuda")


def _damaged(path, tmp_path, how: str):
  data = path.read_bytes()
  out = tmp_path / f"{how}.zip"
  if how == "truncated":
    out.write_bytes(data[: len(data) // 2])
  elif how == "flipped_byte":  # inside a member's data: its CRC no longer matches
    middle = len(data) // 2
    out.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
  elif how == "not_a_zip":
    out.write_text("model weights\n")
  elif how == "foreign_zip":
    with zipfile.ZipFile(out, "w") as z:
      z.writestr("model.json", json.dumps({"format": "something else"}))
  elif how == "missing_fold":
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as z:
      for name in src.namelist():
        if name != "fold1.msgpack":
          z.writestr(name, src.read(name))
  return out


@pytest.mark.parametrize(
  "how", ["truncated", "flipped_byte", "not_a_zip", "foreign_zip", "missing_fold"]
)
def test_a_damaged_or_foreign_zip_is_a_one_line_error_naming_it(model_zip, tmp_path, how):
  bad = _damaged(model_zip, tmp_path, how)
  with pytest.raises(DataError) as e:
    load_model_zip(bad)
  assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
  "file, field, value",
  [("plan.json", "target_spacing", [3.0, 2.0, 2.0]), ("config.json", "model", {})],
)
def test_folds_with_a_different_plan_or_model_are_refused(folds, tmp_path, file, field, value):
  (first, _), (second, _) = folds[1]
  other = tmp_path / "other"
  shutil.copytree(second, other)
  content = json.loads((other / file).read_text())
  content[field] = value
  (other / file).write_text(json.dumps(content))
  with pytest.raises(DataError) as e:
    export.write_model_zip([first, other], tmp_path / "model.zip", which="latest")
  message = str(e.value)
  assert str(first) in message and str(other) in message and field in message
  assert not (tmp_path / "model.zip").exists()


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial_one(
  folds, tmp_path, monkeypatch
):
  output = tmp_path / "model.zip"
  output.write_bytes(b"previous export")

  def disk_full(variables):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(export, "export_forward", lambda *args: b"network")  # not what is tested
  monkeypatch.setattr(export.serialization, "msgpack_serialize", disk_full)
  with pytest.raises(WriteError) as e:
    export.write_model_zip([w for w, _ in folds[1]], output, which="latest")
  assert str(output) in str(e.value) and "No space left" in str(e.value)
  assert output.read_bytes() == b"previous export"
  assert [p.name for p in tmp_path.iterdir()] == ["model.zip"]


@pytest.mark.slow
def test_onnx_model_matches_the_jax_network(folds, onnx_model):
  workdir, variables = folds[1][0]
  loaded = load_onnx(onnx_model)
  (image,), (logits,) = loaded.engine.get_inputs(), loaded.engine.get_outputs()
  window = list(CONFIG.patch_size)
  assert (image.name, image.type, image.shape[1:]) == ("image", "tensor(float)", [*window, 1])
  assert (logits.name, logits.type, logits.shape[1:]) == ("logits", "tensor(float)", [*window, 3])
  assert isinstance(image.shape[0], str)  # any number of windows
  reference = jax.jit(lambda v, x: _inference_model().apply(v, x, train=False))
  for n in (1, 3):
    x = _windows(n, seed=10 + n)
    got, expected = loaded(x), np.asarray(reference(variables, x))
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-3
  assert loaded.plan == PLAN and loaded.class_names[2] == "spleen"
  assert loaded.settings == InferenceSettings(tuple(CONFIG.patch_size), 0.25, True, 2)
  assert loaded.postprocess_classes == (1,)
  meta = json.loads(onnx_metadata_path(onnx_model).read_text())
  assert meta["folds"] == [{"workdir": str(workdir), "step": STEP}]
  decision_file = str(folds[0] / "postprocessing.json")
  assert meta["postprocessing"] == {"classes": [1], "decision": decision_file}


def _softmax64(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.slow
def test_onnx_window_probabilities_are_softmax_averaged_over_the_8_mirrorings(onnx_model):
  loaded = load_onnx(onnx_model)
  x = _windows(2, seed=5)
  plain = _softmax64(loaded(x))
  got = loaded.probabilities(x)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, plain, atol=1e-6)
  mirrored = []
  for flips in itertools.product((False, True), repeat=3):
    axes = tuple(a for a, flip in zip((1, 2, 3), flips) if flip)
    mirrored.append(np.flip(_softmax64(loaded(np.flip(x, axes))), axes))
  got = loaded.probabilities(x, tta=True)
  assert got.dtype == np.float32 and got.shape == plain.shape
  np.testing.assert_allclose(got, np.mean(mirrored, axis=0), atol=1e-6)
  assert np.abs(got - plain).max() > 1e-2  # the mirrorings matter to these weights


def test_onnx_exports_one_fold_and_needs_the_onnx_extra(folds, tmp_path, monkeypatch):
  exp, made = folds
  with pytest.raises(ConfigError, match="one fold"):
    export.write_onnx(exp, tmp_path / "model.onnx")
  for module in ("jax2onnx", "onnxruntime"):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
  with pytest.raises(ConfigError, match=r"pip install 'vnet_jax\[onnx\]'"):
    export.write_onnx(made[0][0], tmp_path / "model.onnx")
  (tmp_path / "model.onnx").write_bytes(b"")
  with pytest.raises(ConfigError, match=r"pip install 'vnet_jax\[onnx\]'"):
    load_onnx(tmp_path / "model.onnx")


def test_a_damaged_onnx_file_or_missing_model_json_is_a_one_line_error(tmp_path):
  path = tmp_path / "model.onnx"
  path.write_bytes(b"not a protobuf")
  with pytest.raises(DataError, match="model.json: missing"):
    load_onnx(path)
  info = ModelInfo(PLAN, {0: "background"}, InferenceSettings((8, 16, 16)), None)
  meta = {"format": "vnet_jax.onnx", "version": 1, **info.metadata(None)}
  (tmp_path / "model.json").write_text(json.dumps(meta))
  # Exported before decisions were recorded: no decision, not an error.
  assert "postprocessing" in meta
  del meta["postprocessing"]
  assert ModelInfo.from_metadata(meta) == info
  with pytest.raises(DataError) as e:
    load_onnx(path)
  assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_cli_exports_an_experiment_directory(folds, model_zip, tmp_path):
  exp, _ = folds
  out = run_module(
    "vnet_jax.export",
    f"--workdir={exp}",
    f"--output={tmp_path / 'model.zip'}",
    "--checkpoint=latest",
    env=subprocess_env(),
  )
  assert out.returncode == 0, out.stderr
  assert "2 fold(s)" in out.stdout
  written, expected = load_model_zip(tmp_path / "model.zip"), load_model_zip(model_zip)
  assert written.workdirs == expected.workdirs
  for a, b in zip(written.fold_variables, expected.fold_variables):
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _predict(predictor: predict.Predictor, scan: Path, out: Path, postprocess: str):
  assert predict.predict_path(predictor, scan, out, postprocess, progress=False) == []
  return nib.load(out / "case.nii.gz")


@pytest.mark.slow
def test_model_zip_predicts_the_workdirs_labels_with_their_postprocessing(
  folds, model_zip, scan, tmp_path, capsys
):
  exp, _ = folds
  from_workdirs = predict.Predictor.from_workdirs(exp, "latest", tta=False)
  expected = _predict(from_workdirs, scan, tmp_path / "workdirs", "auto")
  from_zip = predict.Predictor.from_model(model_zip, tta=False)
  got = _predict(from_zip, scan, tmp_path / "zip", "auto")
  assert f"classes [1], as recorded in {model_zip}" in capsys.readouterr().out
  assert np.array_equal(np.asarray(got.dataobj), np.asarray(expected.dataobj))
  assert np.array_equal(got.affine, expected.affine)
  raw = np.asarray(_predict(from_zip, scan, tmp_path / "none", "none").dataobj)
  assert set(np.unique(raw)) == {0, 1, 2}  # random folds, yet not a trivial labelling
  postprocessed = postprocessing.keep_largest_component(raw, [1])
  assert not np.array_equal(postprocessed, raw)
  assert np.array_equal(np.asarray(got.dataobj), postprocessed)


@pytest.mark.slow
def test_model_onnx_predicts_without_jax_as_its_fold_does(folds, onnx_model, scan, tmp_path):
  # The command line as `python -m vnet_jax.predict` runs it, then which modules it imported.
  code = (
    "import runpy, sys\n"
    "try:\n"
    "  runpy.run_module('vnet_jax.predict', run_name='__main__')\n"
    "except SystemExit as e:\n"
    "  assert not e.code, e.code\n"
    "print('jax:', sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))\n"
  )
  args = [f"--model={onnx_model}", f"--input={scan}", f"--output={tmp_path / 'onnx'}", "--notta"]
  out = subprocess.run(
    [sys.executable, "-c", code, *args],
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
    cwd=Path(__file__).resolve().parent.parent,
  )
  assert out.returncode == 0, out.stderr
  assert "jax: []" in out.stdout
  assert f"classes [1], as recorded in {onnx_model}" in out.stdout
  fold0 = predict.Predictor.from_workdirs(folds[1][0][0], "latest", tta=False)
  expected = _predict(fold0, scan, tmp_path / "jax", "auto")
  got = nib.load(tmp_path / "onnx" / "case.nii.gz")
  assert np.array_equal(got.affine, expected.affine) and got.shape == expected.shape
  assert np.mean(np.asarray(got.dataobj) == np.asarray(expected.dataobj)) >= 0.999
