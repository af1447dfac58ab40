"""Validation during training: compiled once per run, cases shared out between hosts, its
predictions written in the cases' original geometry for the postprocessing decision."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from tests.conftest import make_tiny_config, run_module, subprocess_env
from tests.nifti_cases import dice
from tests.test_inference import WINDOW, make_model, random_volume
from vnet_jax import inference, summaries, train, validate
from vnet_jax.data import cache as cache_lib
from vnet_jax.data import preprocess
from vnet_jax.errors import WriteError

PREDICTIONS = ("eval", "predictions")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def cache(tiny_dataset, cache_dir):
  settings = train.preprocess_settings(make_tiny_config(tiny_dataset, cache_dir))
  return cache_lib.prepare_dataset(tiny_dataset, settings, cache_dir, num_workers=0, progress=False)


@pytest.mark.parametrize("num_cases,hosts", [(10, 1), (10, 3), (2, 4), (7, 2)])
def test_each_case_is_validated_on_exactly_one_host(num_cases, hosts):
  cases = [f"case_{i:02d}" for i in range(num_cases)]
  shares = [validate.host_share(cases, p, hosts) for p in range(hosts)]
  assert sorted(c for share in shares for c in share) == cases
  assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_gathering_on_one_host_returns_its_own_scores():
  scores = {"case_01": {"liver": {"dice": 0.5, "nsd": float("nan"), "hd95": 3.0}}}
  assert validate.gather_from_hosts(scores) == [scores]


def test_new_weights_give_new_predictions_without_a_new_compile():
  apply_fn, first = make_model(kernel=3)
  _, second = make_model(kernel=3, seed=1)
  volume = random_volume((12, 10, 9))
  reused = inference.SlidingWindowPredictor(apply_fn, first, WINDOW, 3)
  before = reused.predict_probabilities(volume, np.float32)
  reused.set_variables(second)
  after = reused.predict_probabilities(volume, np.float32)
  fresh = inference.SlidingWindowPredictor(apply_fn, second, WINDOW, 3)
  np.testing.assert_array_equal(after, fresh.predict_probabilities(volume, np.float32))
  assert not np.allclose(before, after)
  assert len(reused._step._executables) == 1


class Oracle:
  """A stand-in network whose input is the reference label: a perfect prediction."""

  num_classes = 14  # FLARE22's 13 organs and background

  def clone(self, **_):
    return self

  def apply(self, variables, x, train):
    return 50.0 * jax.nn.one_hot(x[..., 0].astype(jnp.int32), self.num_classes)


class LabelsAsImages:
  """The cache with each case's label as its image (what the oracle reads) and, for some
  cases, another image file named in the meta."""

  def __init__(self, cache, image_files):
    self.plan, self.cache, self.image_files = cache.plan, cache, image_files

  def load_case(self, case_id):
    _, label = self.cache.load_case(case_id)
    return label[..., None].astype(np.float32), label

  def load_meta(self, case_id):
    meta = self.cache.load_meta(case_id)
    if case_id in self.image_files:
      meta["image_files"] = [str(self.image_files[case_id])]
    return meta


def one_hot(label):
  return np.eye(Oracle.num_classes, dtype=np.float16)[label]


def test_predictions_are_written_in_the_original_geometry(tiny_dataset, cache_dir, cache, tmp_path):
  config = make_tiny_config(tiny_dataset, cache_dir)
  ids = list(cache.case_ids[:3])  # three orientations (PLS, LPI, RSA: axes permuted)
  # One case's image file carries header fields to keep; another's has gone (a moved dataset).
  tagged = nib.load(cache.load_meta(ids[0])["image_files"][0])
  tagged.header["descrip"] = b"scanner 7"
  tagged.set_qform(tagged.affine, code=2)
  nib.save(tagged, tmp_path / "tagged.nii.gz")
  fake = LabelsAsImages(cache, {ids[0]: tmp_path / "tagged.nii.gz", ids[1]: tmp_path / "gone"})
  names = {c: str(c) for c in range(Oracle.num_classes)}
  variables = {"unused": np.zeros(1, np.float32)}
  validator = validate.Validator(config, Oracle(), variables, fake, ids, names)
  out = tmp_path / "predictions"
  assert validator(variables, out)["mean_dice"] == 1.0
  assert validator(variables)["mean_dice"] == 1.0  # scores only
  assert sorted(p.name for p in out.iterdir()) == sorted(
    f"{c}{ext}" for c in ids for ext in (".nii.gz", ".npz")
  )  # and no temporary files left
  linear_differs = []
  for cid in ids:
    meta, (_, label) = cache.load_meta(cid), cache.load_case(cid)
    with np.load(out / f"{cid}.npz") as z:
      np.testing.assert_array_equal(z["labels"], label)
    written = nib.load(out / f"{cid}.nii.gz")
    image = nib.load(meta["image_files"][0])
    reference = np.asarray(nib.load(meta["label_file"]).dataobj)
    assert written.shape == image.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)
    # Mapped back as predict does: the one-hot probabilities, class by class.
    expected = preprocess.probabilities_to_original(one_hot(label), meta)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    linear_differs.append(np.any(expected != preprocess.labels_to_original(label, meta)))
    # Resampling there and back costs a voxel at borders; a mirrored axis would score < 0.6.
    assert dice(expected > 0, reference > 0) > 0.75
  assert any(linear_differs)  # so the check above tells linear from nearest mapping back
  assert nib.load(out / f"{ids[0]}.nii.gz").header["descrip"] == b"scanner 7"
  assert nib.load(out / f"{ids[0]}.nii.gz").get_qform(coded=True)[1] == 2


def test_a_failed_write_keeps_the_previous_prediction(cache, tmp_path, monkeypatch):
  case_id = cache.case_ids[0]
  path = tmp_path / f"{case_id}.nii.gz"
  path.write_bytes(b"the previous prediction")

  def disk_full(image, filename):
    Path(filename).write_bytes(b"half a file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(nib, "save", disk_full)
  probs = one_hot(cache.load_case(case_id)[1])
  with pytest.raises(WriteError, match=rf"^{re.escape(str(path))}: cannot write \(No space"):
    validate.write_original_geometry(path, probs, cache.load_meta(case_id))
  assert path.read_bytes() == b"the previous prediction"
  assert os.listdir(tmp_path) == [path.name]  # no temporary file left


@pytest.fixture(scope="module")
def experiment(tiny_dataset, cache_dir, tmp_path_factory):
  """(EXP, the arguments of every Validator training built) where EXP/fold0 is fold 0 of a
  two-fold tiny experiment, trained here with two validations."""
  exp = tmp_path_factory.mktemp("exp")
  config = make_tiny_config(tiny_dataset, cache_dir, num_folds=2, num_steps=2, eval_every=1)
  built = []
  original = validate.Validator.__init__

  def recording_init(self, *args, **kwargs):
    built.append(args)
    original(self, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(validate.Validator, "__init__", recording_init)
    train.train_and_evaluate(config, exp / "fold0", fold=0)
  return exp, built


@pytest.mark.slow
def test_a_run_builds_its_validator_once(experiment):
  exp, built = experiment
  history = (exp / "fold0" / "eval" / "history.jsonl").read_text().splitlines()
  assert len(history) == 2  # two evaluations ...
  assert len(built) == 1  # ... by one validator


@pytest.mark.slow
def test_cross_validation_decides_postprocessing_from_the_validation(experiment):
  exp, built = experiment
  # Fold 1's validation cases predicted with fold 0's network (training a second fold would
  # double the time; the decision needs only each fold's validation predictions).
  splits = json.loads((exp / "fold0" / "splits.json").read_text())
  config, model, variables, cache, _, names = built[0]
  fold1 = exp / "fold1"
  shutil.copytree(exp / "fold0", fold1, ignore=shutil.ignore_patterns("eval", "checkpoints"))
  validator = validate.Validator(config, model, variables, cache, splits[1]["val"], names)
  summary = validator(variables, fold1.joinpath(*PREDICTIONS))
  summaries.write_summary(summary, fold1 / "eval" / "summary.json")
  for k in (0, 1):
    written = (exp / f"fold{k}").joinpath(*PREDICTIONS).glob("*.nii.gz")
    assert sorted(p.name[: -len(".nii.gz")] for p in written) == sorted(splits[k]["val"])
  p = run_module("vnet_jax.evaluate", f"--cv={exp}", env=subprocess_env())
  assert p.returncode == 0, p.stderr
  decision = json.loads((exp / "postprocessing.json").read_text())
  assert decision["folds"] == ["fold0", "fold1"] and decision["num_cases"] == 6
  assert set(decision["classes"]) == {str(c) for c in range(1, 14)}
  assert all(isinstance(c["applied"], bool) for c in decision["classes"].values())
