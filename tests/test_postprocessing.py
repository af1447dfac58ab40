"""Largest-component postprocessing: the operation, the cross-validated decision, its file."""

import json

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import run_module
from tests.nifti_cases import dice
from vnet_jax import postprocessing as pp
from vnet_jax.errors import DataError

SHAPE = (12, 12, 12)
NAMES = {1: "liver", 2: "kidney", 3: "spleen"}
KIDNEY_IN_FILES = 13  # the references store the kidney as 13; the plan's label_lut maps it to 2


def block(labels, lo, size, value):
  labels[tuple(slice(a, a + s) for a, s in zip(lo, size))] = value
  return labels


# ---------------------------------------------------------------------------- the operation


def test_stray_island_is_removed_other_classes_untouched():
  labels = block(np.zeros(SHAPE, np.uint8), (1, 1, 1), (4, 4, 4), 1)
  labels[10, 10, 10] = 1  # stray island
  block(labels, (8, 1, 1), (2, 2, 2), 2)  # class 2: two components, not listed
  labels[1, 10, 10] = 2
  original = labels.copy()
  out = pp.keep_largest_component(labels, [1, 3])  # 3 is absent
  expected = original.copy()
  expected[10, 10, 10] = 0
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == labels.dtype
  np.testing.assert_array_equal(labels, original)  # input not modified


def test_components_are_26_connected():
  labels = block(np.zeros(SHAPE, np.uint8), (4, 4, 4), (1, 1, 3), 1)  # bar on 4,4,4..6
  labels[5, 5, 7] = 1  # touches the bar's end at a corner only
  labels[3, 3, 3] = 1  # a corner neighbour of the bar's start
  labels[5, 4, 3] = 1  # an edge neighbour of it
  labels[4, 4, 9] = 1  # two voxels away from the bar: its own component
  out = pp.keep_largest_component(labels, [1])
  expected = labels.copy()
  expected[4, 4, 9] = 0
  np.testing.assert_array_equal(out, expected)


def test_equal_largest_components_all_stay_and_bad_arguments():
  labels = block(np.zeros(SHAPE, np.int32), (1, 1, 1), (2, 2, 2), 4)
  block(labels, (8, 8, 8), (2, 2, 2), 4)
  labels[5, 10, 1] = 4
  out = pp.keep_largest_component(labels, [4])
  assert np.count_nonzero(out == 4) == 16 and out[5, 10, 1] == 0
  with pytest.raises(ValueError, match="foreground"):
    pp.keep_largest_component(labels, [0])
  with pytest.raises(ValueError, match="integer"):
    pp.keep_largest_component(labels.astype(np.float32), [4])


# ---------------------------------------------------------------------------- a fake experiment


def save(path, arr):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(arr, np.uint8), np.eye(4)), str(path))


def make_cases():
  """{case: (prediction, reference as stored, the prediction with every class's largest
  component only)}, worked out by hand."""
  cases = {}
  for k, cid in enumerate(("a", "b", "c")):
    ref = block(np.zeros(SHAPE, np.uint8), (1, 1, 1 + k), (4, 4, 4), 1)
    # The kidney is legitimately two parts (8 and 4 voxels) in the reference.
    block(ref, (8, 1, 1), (2, 2, 2), KIDNEY_IN_FILES)
    block(ref, (8, 8, 8), (2, 2, 1), KIDNEY_IN_FILES)
    block(ref, (1, 8, 8), (3, 3, 3), 3)
    pred = np.where(ref == KIDNEY_IN_FILES, 2, ref).astype(np.uint8)
    pred[1, 1 + k, 1 + k] = 0  # a different liver error per case
    block(pred, (1, 8, 8), (3, 3, 3), 0)
    block(pred, (1, 8, 7 + k), (3, 3, 3), 3)  # spleen: one component, shifted by k
    largest = block(pred.copy(), (8, 8, 8), (2, 2, 1), 0)  # without the smaller kidney part
    pred[10, 10, 1 + k] = 1  # a stray liver island
    cases[cid] = (pred, ref, largest)
  return cases


def make_experiment(root, folds=(("a",), ("b", "c"))):
  """root/exp/fold*/ as training leaves them (plan.json, eval/), the dataset in root/data."""
  cases = make_cases()
  data, exp = root / "data", root / "exp"
  lut = list(range(256))
  lut[KIDNEY_IN_FILES] = 2
  for cid, (_, ref, _) in cases.items():
    save(data / "images" / f"{cid}_0000.nii.gz", np.zeros(SHAPE))
    save(data / "labels" / f"{cid}.nii.gz", ref)
  plan = {
    "dataset_root": str(data),
    "label_lut": lut,
    "class_names": {"0": "background", **{str(c): n for c, n in NAMES.items()}},
  }
  summary = {"mean_dice": 0.9, "mean_nsd": 0.9, "per_class": {}, "per_case": []}
  for k, ids in enumerate(folds):
    fold = exp / f"fold{k}"
    (fold / "eval").mkdir(parents=True)
    (fold / "plan.json").write_text(json.dumps(plan))
    (fold / "eval" / "summary.json").write_text(json.dumps(summary))
    for cid in ids:
      save(fold / pp.PREDICTIONS / f"{cid}.nii.gz", cases[cid][0])
    (fold / pp.PREDICTIONS / f"{ids[0]}.npz").write_bytes(b"a report overlay, not a case")
  return exp, cases


def expected_means(cases):
  """{class: (mean Dice before, after)} over the pooled cases, in float64."""
  out = {}
  for c in NAMES:
    ref_id = KIDNEY_IN_FILES if c == 2 else c
    before = [dice(pred == c, ref == ref_id) for pred, ref, _ in cases.values()]
    after = [dice(largest == c, ref == ref_id) for _, ref, largest in cases.values()]
    out[c] = (np.mean(before, dtype=np.float64), np.mean(after, dtype=np.float64))
  return out


def test_decision_follows_pooled_dice(tmp_path):
  exp, cases = make_experiment(tmp_path)
  d = pp.decide(exp)
  assert d["folds"] == ["fold0", "fold1"] and d["num_cases"] == 3 and d["connectivity"] == 26
  expected = expected_means(cases)
  for c, name in NAMES.items():
    s = d["classes"][str(c)]
    assert s["name"] == name
    assert s["dice_before"] == pytest.approx(expected[c][0], abs=1e-12)
    assert s["dice_after"] == pytest.approx(expected[c][1], abs=1e-12)
  # The island costs the liver; the kidney needs both parts; the spleen never changes.
  assert expected[1][1] > expected[1][0] and d["classes"]["1"]["applied"] is True
  assert expected[2][1] < expected[2][0] and d["classes"]["2"]["applied"] is False
  assert expected[3][1] == expected[3][0] and d["classes"]["3"]["applied"] is False
  path = pp.write_decision(d, exp)
  assert path == exp / "postprocessing.json"
  assert json.loads(path.read_text()) == d
  applied = pp.read_decision(path)
  assert applied == [1]
  # Applying the decision keeps both kidney parts and drops the liver island.
  pred, _, largest = cases["a"]
  out = pp.keep_largest_component(pred, applied)
  np.testing.assert_array_equal(out == 2, pred == 2)
  np.testing.assert_array_equal(out == 1, largest == 1)


@pytest.mark.parametrize(
  "breakage, message",
  [
    ("duplicate", "also a validation case of"),
    ("no_predictions", "prediction folder does not exist"),
    ("no_plan", "plan.json: does not exist"),
    ("no_reference", "no reference label for case 'z'"),
  ],
)
def test_decide_errors_name_the_file(tmp_path, breakage, message):
  folds = (("a", "b"), ("b", "c")) if breakage == "duplicate" else (("a",), ("b", "c"))
  exp, cases = make_experiment(tmp_path, folds)
  if breakage == "no_predictions":
    for f in (exp / "fold1" / pp.PREDICTIONS).iterdir():
      f.unlink()
    (exp / "fold1" / pp.PREDICTIONS).rmdir()
  elif breakage == "no_plan":
    (exp / "fold1" / "plan.json").unlink()
  elif breakage == "no_reference":
    save(exp / "fold1" / pp.PREDICTIONS / "z.nii.gz", cases["a"][0])
  with pytest.raises(DataError, match=message) as e:
    pp.decide(exp)
  assert str(exp / "fold1") in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- the file


@pytest.mark.parametrize(
  "text, message",
  [
    ("{not json", "unreadable"),
    ("[]", "no 'classes'"),
    ('{"connectivity": 6, "classes": {}}', "connectivity 6"),
    ('{"connectivity": 26, "classes": {"liver": {"applied": true}}}', "class id 'liver'"),
    ('{"connectivity": 26, "classes": {"1": {"applied": "yes"}}}', "must be true or false"),
  ],
)
def test_read_decision_malformed(tmp_path, text, message):
  path = tmp_path / "postprocessing.json"
  path.write_text(text)
  with pytest.raises(DataError, match=message) as e:
    pp.read_decision(path)
  assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
  with pytest.raises(DataError, match="does not exist"):
    pp.read_decision(tmp_path / "nope.json")


def test_find_decision(tmp_path):
  exp = tmp_path / "exp"
  folds = [exp / "fold0", exp / "fold1"]
  for f in folds:
    f.mkdir(parents=True)
  assert pp.find_decision(folds) is None
  (exp / "postprocessing.json").write_text("{}")
  assert pp.find_decision(folds) == exp / "postprocessing.json"  # the experiment's
  (folds[0] / "postprocessing.json").write_text("{}")
  assert pp.find_decision(folds[:1]) == folds[0] / "postprocessing.json"  # the workdir's first
  with pytest.raises(DataError, match="differ"):
    pp.find_decision(folds)  # fold0's own file and the experiment's
  other = tmp_path / "other" / "fold0"
  other.mkdir(parents=True)
  with pytest.raises(DataError, match="differ") as e:
    pp.find_decision([folds[1], other])  # one experiment decided, the other not
  assert str(other) in str(e.value)


# ---------------------------------------------------------------------------- command line


@pytest.mark.slow
def test_evaluate_cv_writes_the_decision(tmp_path):
  exp, _ = make_experiment(tmp_path)
  p = run_module("vnet_jax.evaluate", f"--cv={exp}")
  assert p.returncode == 0, p.stderr
  assert (exp / "cv_summary.json").is_file()
  decision = json.loads((exp / "postprocessing.json").read_text())
  assert decision == pp.decide(exp)
  table = p.stdout[p.stdout.index("postprocessing (") :].splitlines()
  rows = {line.split()[0]: line.split() for line in table[2:]}
  assert rows["liver"][-1] == "yes" and rows["kidney"][-1] == "no" and rows["spleen"][-1] == "no"
  assert float(rows["liver"][1]) == pytest.approx(decision["classes"]["1"]["dice_before"], abs=1e-4)
  assert f"wrote {exp / 'postprocessing.json'}" in p.stdout
