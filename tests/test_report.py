"""report.py on a fake training workdir built around a real (tiny) preprocessed cache."""

import html
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_module
from tests.test_plots import assert_png
from vnet_jax import report
from vnet_jax.data import cache as cache_lib
from vnet_jax.data import synthetic
from vnet_jax.data.plan import PreprocessSettings
from vnet_jax.errors import DataError

REPO = Path(__file__).resolve().parent.parent
# Names with HTML metacharacters, to check the page escapes them.
NAMES = {"0": "background", "1": "liver", "2": "kidney <R>", "3": "spleen & co"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.write_dataset(str(root / "ds"), 2, shape=(32, 32, 12))
  # Three organs, as a 3-class experiment's label_map would give.
  settings = PreprocessSettings(label_map=((1, 1), (2, 2), (3, 3)))
  return cache_lib.prepare_dataset(
    root / "ds", settings, root / "cache", num_workers=0, progress=False
  )


def organ_scores(dice, nsd, hd95):
  return {"dice": dice, "nsd": nsd, "hd95": hd95}


def make_workdir(path: Path, cache) -> Path:
  (path / "eval" / "predictions").mkdir(parents=True)
  with (path / "metrics.jsonl").open("w") as f:
    for step in (10, 20, 30, 40):
      f.write(
        json.dumps(
          {
            "step": step,
            "loss": 2.0 / step**0.5,
            "dice_loss": 1.0 / step**0.5,
            "focal_loss": 1.0 / step,
            "accuracy": 1 - 1 / step,
            "iou": 0.2 + step / 100,
            "learning_rate": 1e-3 * step / 40,
            "steps_per_s": 3.0,
          }
        )
        + "\n"
      )
    f.write('{"step": 50, "loss"')  # half-written by a running training: skipped
  with (path / "eval" / "history.jsonl").open("w") as f:
    for step, d in ((20, 0.3), (40, 0.55)):
      f.write(
        json.dumps(
          {
            "step": step,
            "mean_dice": d,
            "per_class": {NAMES["1"]: d + 0.1, NAMES["2"]: d, NAMES["3"]: d - 0.1},
          }
        )
        + "\n"
      )
  per_case = []
  for i, case in enumerate(cache.case_ids):
    _, label = cache.load_case(case)
    pred = np.asarray(label).copy()
    pred[pred == 3] = 0  # the "model" misses the spleen...
    pred = np.roll(pred, 1, axis=2)  # ...and is off by a voxel
    np.savez_compressed(path / "eval" / "predictions" / f"{case}.npz", labels=pred)
    per_case.append(
      {
        "case": case,
        "per_class": {
          NAMES["1"]: organ_scores(0.9 - 0.1 * i, 0.8, 3.0),
          NAMES["2"]: organ_scores(0.7, 0.6, 5.5),
          NAMES["3"]: organ_scores(0.0, 0.0, None),
        },
      }
    )
  summary = {
    "step": 40,
    "mean_dice": 0.51666,
    "mean_nsd": 0.4667,
    "per_class": {
      NAMES["1"]: organ_scores(0.85, 0.8, 3.0),
      NAMES["2"]: organ_scores(0.7, 0.6, 5.5),
      NAMES["3"]: organ_scores(0.0, 0.0, None),
    },
    "per_case": per_case,
  }
  (path / "eval" / "summary.json").write_text(json.dumps(summary))
  plan = {**cache.plan, "cache_dir": str(cache.dir.absolute()), "class_names": NAMES}
  (path / "plan.json").write_text(json.dumps(plan))
  return path


def test_make_report(tmp_path, cache):
  wd = make_workdir(tmp_path / "run", cache)
  (wd / "plots").mkdir()
  (wd / "plots" / "overlay_old_case.png").write_bytes(b"stale")
  out = report.make_report(wd)
  assert out == wd / "report.html"
  plots = wd / "plots"
  assert_png(plots / "training_curves.png")
  assert_png(plots / "dice_per_class.png")
  overlays = sorted(p.name for p in plots.glob("overlay_*.png"))
  assert overlays == [f"overlay_{c}.png" for c in sorted(cache.case_ids)]  # stale one gone
  for name in overlays:
    assert_png(plots / name)

  page = out.read_text()
  for name in list(NAMES.values())[1:]:
    assert html.escape(name) in page
  assert "kidney <R>" not in page and "spleen & co" not in page
  assert "<b>0.5167</b>" in page  # mean Dice, formatted like summaries.format_table
  assert "n/a" in page  # the spleen's null HD95
  for png in ["training_curves.png", "dice_per_class.png", *overlays]:
    assert f'<img src="plots/{png}"' in page
  assert "1 malformed line(s) skipped" in page
  for case in cache.case_ids:
    assert case in page


def test_missing_optional_inputs(tmp_path, cache):
  wd = make_workdir(tmp_path / "run", cache)
  (wd / "eval" / "history.jsonl").unlink()
  shutil.rmtree(wd / "eval" / "predictions")
  page = report.make_report(wd).read_text()
  assert_png(wd / "plots" / "training_curves.png")
  assert_png(wd / "plots" / "dice_per_class.png")
  assert not list((wd / "plots").glob("overlay_*"))
  assert "eval/history.jsonl missing" in page and "no eval/predictions" in page

  # Predictions present but the cache is gone: noted, the rest of the report still made.
  wd2 = make_workdir(tmp_path / "run2", cache)
  plan = json.loads((wd2 / "plan.json").read_text())
  (wd2 / "plan.json").write_text(json.dumps({**plan, "cache_dir": str(tmp_path / "gone")}))
  (wd2 / "metrics.jsonl").unlink()
  page = report.make_report(wd2).read_text()
  assert "no longer exists" in page and "metrics.jsonl missing" in page
  assert not list((wd2 / "plots").glob("overlay_*"))
  assert_png(wd2 / "plots" / "training_curves.png")  # from the history alone


def test_bad_workdir_and_summary(tmp_path):
  with pytest.raises(DataError, match="workdir does not exist"):
    report.make_report(tmp_path / "nope")
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "summary.json").write_text('{"per_class": ')
  with pytest.raises(DataError) as e:
    report.make_report(tmp_path)
  assert "summary.json" in str(e.value) and "\n" not in str(e.value)
  (tmp_path / "eval" / "summary.json").unlink()
  with pytest.raises(DataError, match="not a training workdir"):
    report.make_report(tmp_path)


def run_cli(*args):
  return run_module("vnet_jax.report", *args)


@pytest.mark.slow
def test_cli(tmp_path, cache):
  wd = make_workdir(tmp_path / "run", cache)
  shutil.rmtree(wd / "eval" / "predictions")  # keep the subprocess quick
  ok = run_cli(f"--workdir={wd}")
  assert ok.returncode == 0, ok.stderr
  assert "wrote" in ok.stdout and (wd / "report.html").is_file()
  assert "0.5167" in ok.stdout  # the summary table
  bad = run_cli(f"--workdir={tmp_path / 'missing'}")
  assert bad.returncode == 1
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]


def test_report_leaves_the_matplotlib_backend_alone(tmp_path):
  # A notebook (or training) that imports the package keeps its backend: here "svg", which
  # `matplotlib.use("Agg")` or importing pyplot would have changed or pinned.
  wd = tmp_path / "run"
  (wd / "eval").mkdir(parents=True)
  (wd / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
  summary = {
    "mean_dice": 0.5,
    "mean_nsd": 0.5,
    "per_class": {"liver": {"dice": 0.5, "nsd": 0.5, "hd95": 1.0}},
    "per_case": [{"case": "a", "per_class": {"liver": {"dice": 0.5, "nsd": 0.5, "hd95": 1.0}}}],
  }
  (wd / "eval" / "summary.json").write_text(json.dumps(summary))
  code = textwrap.dedent(
    f"""
    import sys
    import matplotlib
    from vnet_jax import plots, report
    report.make_report({str(wd)!r})
    print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
    """
  )
  env = {**os.environ, "MPLBACKEND": "svg"}
  p = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert p.returncode == 0, p.stderr
  assert p.stdout.split() == ["svg", "False"]
  assert_png(wd / "plots" / "dice_per_class.png")
