"""Reading trained runs: the folds --workdir names, in fold order, and the check that the folds
of an ensemble share one plan and model."""

import json
from pathlib import Path

import pytest

from vnet_jax import trained_runs
from vnet_jax.errors import DataError

CONFIG = {"patch_size": [8, 16, 16], "compute_dtype": "float32", "model": {"filters": [8, 16]}}


def _plan(target_spacing=(2.5, 0.8, 0.7)) -> dict:
  return {
    "num_channels": 1,
    "target_spacing": list(target_spacing),
    "class_names": {"0": "background", "1": "liver"},
  }


def _fake_run(folder: Path, config: dict, plan: dict, with_checkpoint=True) -> None:
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(config))
  (folder / "plan.json").write_text(json.dumps(plan))
  if with_checkpoint:
    (folder / "checkpoints" / "4").mkdir(parents=True)


def test_folds_are_found_in_fold_order_and_must_share_one_plan_and_model(tmp_path):
  exp = tmp_path / "exp"
  for name in ("fold10", "fold2", "fold0"):
    _fake_run(exp / name, CONFIG, _plan())
  _fake_run(exp / "fold3", CONFIG, _plan(), with_checkpoint=False)
  assert trained_runs.find_workdirs(exp) == [exp / "fold0", exp / "fold2", exp / "fold10"]
  given = f"{exp / 'fold2'},{exp / 'fold0'}"
  assert trained_runs.find_workdirs(given) == [exp / "fold2", exp / "fold0"]

  other = {**CONFIG, "model": {"filters": [8, 32]}}
  _fake_run(tmp_path / "b" / "fold0", CONFIG, _plan())
  _fake_run(tmp_path / "b" / "fold1", other, _plan())
  with pytest.raises(DataError) as e:
    trained_runs.read_folds(tmp_path / "b")
  assert str(e.value) == (
    f"{tmp_path / 'b' / 'fold0'} and {tmp_path / 'b' / 'fold1'}: config.json field "
    "model.filters[1] (16 vs 32) differs; the folds of an ensemble must share one plan and model"
  )
  _fake_run(tmp_path / "c" / "fold0", CONFIG, _plan())
  _fake_run(tmp_path / "c" / "fold1", CONFIG, _plan((2.5, 0.8, 0.8)))
  with pytest.raises(DataError, match=r"plan.json field target_spacing\[2\] \(0.7 vs 0.8\)"):
    trained_runs.read_folds(tmp_path / "c")


def test_an_experiment_without_a_trained_fold_or_a_run_without_its_files_is_a_clear_error(
  tmp_path,
):
  (tmp_path / "exp" / "fold0").mkdir(parents=True)  # a fold not trained yet
  with pytest.raises(DataError, match=r"exp: no fold\*/ workdir in it has a checkpoint$"):
    trained_runs.find_workdirs(tmp_path / "exp")
  with pytest.raises(DataError, match=r"config.json: missing; is .* the workdir of a training"):
    trained_runs.read_run(tmp_path / "exp" / "fold0")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{")
  (tmp_path / "run" / "plan.json").write_text("{}")
  with pytest.raises(DataError, match=r"run: cannot read config.json / plan.json \(Expecting"):
    trained_runs.read_run(tmp_path / "run")
