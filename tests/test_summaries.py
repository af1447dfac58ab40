"""summary.json/.csv writing and reading, the text tables and the cross-validation summary."""

import csv
import json
import math
import os

import numpy as np
import pytest

from vnet_jax import scoring, summaries
from vnet_jax.errors import DataError


def scores(dice, nsd, hd95):
  return {"dice": dice, "nsd": nsd, "hd95": hd95}


def test_write_then_read_summary_round_trip(tmp_path):
  per_case = {
    "case_a": {"liver": scores(0.9, 0.8, 3.5), "aorta": scores(0.5, 0.25, 7.0)},
    "case_b": {"liver": scores(0.7, 0.6, 1.5), "aorta": scores(0.0, 0.0, math.nan)},
  }
  summary = {"step": 40, **scoring.summarize(per_case)}
  path_json, path_csv = summaries.write_summary(summary, tmp_path / "out" / "summary.json")
  assert path_csv == tmp_path / "out" / "summary.csv"
  assert sorted(os.listdir(tmp_path / "out")) == ["summary.csv", "summary.json"]  # no tmp left
  raw = json.loads(path_json.read_text())
  assert raw["per_case"][1]["per_class"]["aorta"]["hd95"] is None  # NaN -> null

  rows = list(csv.DictReader(path_csv.open()))
  assert [(r["case"], r["class"]) for r in rows] == [
    ("case_a", "liver"),
    ("case_a", "aorta"),
    ("case_b", "liver"),
    ("case_b", "aorta"),
  ]
  assert float(rows[0]["dice"]) == 0.9 and float(rows[1]["hd95"]) == 7.0
  assert rows[3]["hd95"] == "nan"

  back = summaries.read_summary(path_json)
  assert back["step"] == 40
  assert math.isnan(back["per_case"][1]["per_class"]["aorta"]["hd95"])  # null -> NaN
  assert back["per_class"]["aorta"]["hd95"] == pytest.approx(np.float64(7.0), abs=1e-12)
  assert back["per_class"]["liver"]["dice"] == pytest.approx(np.mean([0.9, 0.7]), abs=1e-12)
  assert back["mean_dice"] == pytest.approx(np.mean([0.8, 0.25]), abs=1e-12)
  assert back["mean_nsd"] == pytest.approx(np.mean([0.7, 0.125]), abs=1e-12)


def test_read_summary_errors_are_one_line(tmp_path):
  with pytest.raises(DataError, match=r"summary\.json: summary file does not exist"):
    summaries.read_summary(tmp_path / "summary.json")
  bad = {
    "not json": "{not json",
    "no per_class": json.dumps({"mean_dice": 0.5}),
    "string score": json.dumps({"mean_dice": 0.5, "per_class": {"liver": {"dice": "0.5"}}}),
    "bool score": json.dumps({"mean_dice": True, "per_class": {}}),
  }
  for text in bad.values():
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(DataError, match=r"summary\.json: unreadable summary") as e:
      summaries.read_summary(tmp_path / "summary.json")
    assert "\n" not in str(e.value)


def test_format_table():
  summary = {
    "mean_dice": 0.51666,
    "mean_nsd": None,
    "per_class": {"liver": scores(0.85, 0.8, 3.0), "spleen": scores(np.float32(0.5), 0.0, None)},
  }
  lines = summaries.format_table(summary).splitlines()
  assert lines[0].split() == ["class", "dice", "nsd", "hd95"]
  assert lines[1].split() == ["liver", "0.8500", "0.8000", "3.00"]
  assert lines[2].split() == ["spleen", "0.5000", "0.0000", "nan"]
  assert lines[3].split() == ["mean", "0.5167", "nan"]


def test_cross_validation_summary(tmp_path):
  rng = np.random.default_rng(1)
  exp = tmp_path / "runs" / "exp"
  dice = rng.uniform(0.5, 1.0, (3, 2))
  nsd = rng.uniform(0.5, 1.0, (3, 2))
  hd = rng.uniform(1, 9, (3, 2))
  hd[1, 0] = np.nan
  for k in range(3):
    per_class = {
      n: scores(float(dice[k, i]), float(nsd[k, i]), float(hd[k, i]))
      for i, n in enumerate(["liver", "spleen"])
    }
    summary = scoring.summarize({"c": per_class})
    summaries.write_summary(summary, exp / f"fold{k}" / "eval" / "summary.json")
  (exp / "notes").mkdir()  # not a fold
  cv = summaries.cross_validation_summary(exp)
  assert cv["folds"] == ["fold0", "fold1", "fold2"]
  for i, n in enumerate(["liver", "spleen"]):
    assert cv["per_class"][n]["dice"]["mean"] == pytest.approx(np.mean(dice[:, i]), abs=1e-12)
    assert cv["per_class"][n]["dice"]["std"] == pytest.approx(np.std(dice[:, i]), abs=1e-12)
    assert cv["per_class"][n]["nsd"]["std"] == pytest.approx(np.std(nsd[:, i]), abs=1e-12)
    assert cv["per_class"][n]["hd95"]["mean"] == pytest.approx(np.nanmean(hd[:, i]), abs=1e-12)
  fold_means = dice.mean(axis=1)
  assert cv["mean_dice"]["mean"] == pytest.approx(np.mean(fold_means), abs=1e-12)
  assert cv["mean_dice"]["std"] == pytest.approx(np.std(fold_means), abs=1e-12)
  assert cv["mean_nsd"]["std"] == pytest.approx(np.std(nsd.mean(axis=1)), abs=1e-12)
  assert [f["fold"] for f in cv["per_fold"]] == cv["folds"]

  path_json, path_csv = summaries.write_cv_summary(cv, exp)
  assert json.loads(path_json.read_text())["folds"] == cv["folds"]
  rows = list(csv.DictReader(path_csv.open()))
  assert [r["class"] for r in rows] == ["liver", "spleen", "mean"]
  assert float(rows[2]["dice_std"]) == pytest.approx(np.std(fold_means), abs=1e-12)
  table = summaries.format_cv_table(cv)
  assert table.splitlines()[0] == "3 folds: fold0, fold1, fold2"
  assert f"{np.mean(fold_means):.4f} +- {np.std(fold_means):.4f}" in table.splitlines()[-1]

  # A fold without its summary is a one-line error naming the file.
  (exp / "fold3" / "eval").mkdir(parents=True)
  with pytest.raises(DataError, match=r"fold3/eval/summary\.json"):
    summaries.cross_validation_summary(exp)
  (exp / "fold3" / "eval" / "summary.json").write_text("{not json")
  with pytest.raises(DataError, match=r"fold3/eval/summary\.json: unreadable"):
    summaries.cross_validation_summary(exp)


def test_fold_order_is_numeric(tmp_path):
  for k in (10, 2, 1):
    s = scoring.summarize({"c": {"liver": scores(k / 10, 0.5, 1.0)}})
    summaries.write_summary(s, tmp_path / f"fold{k}" / "eval" / "summary.json")
  assert summaries.cross_validation_summary(tmp_path)["folds"] == ["fold1", "fold2", "fold10"]
