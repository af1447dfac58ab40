"""Cross-validation splits: nnU-Net's (scikit-learn KFold), user files, fold selection."""

import json

import numpy as np
import pytest
from sklearn.model_selection import KFold

from vnet_jax.data import folds
from vnet_jax.errors import DataError

IDS = [f"case_{i:03d}" for i in range(23)]


@pytest.mark.parametrize("n, k", [(23, 5), (10, 5), (5, 5), (7, 3)])
def test_splits_partition_cases(n, k):
  ids = IDS[:n]
  splits = folds.create_splits(ids, num_folds=k)
  assert len(splits) == k
  vals = [set(s["val"]) for s in splits]
  assert set().union(*vals) == set(ids)
  assert sum(len(v) for v in vals) == n  # disjoint
  sizes = sorted(len(v) for v in vals)
  assert sizes[-1] - sizes[0] <= 1
  for s in splits:
    assert set(s["train"]) == set(ids) - set(s["val"])
    assert s["train"] == sorted(s["train"]) and s["val"] == sorted(s["val"])


@pytest.mark.parametrize("n, k, seed", [(23, 5, 12345), (23, 5, 7), (10, 3, 0), (5, 5, 1)])
def test_splits_equal_nnunet_generate_crossval_split(n, k, seed):
  # nnU-Net v2's generate_crossval_split: KFold(shuffle=True) over the sorted case ids.
  ids = sorted(IDS[:n])
  kfold = KFold(n_splits=k, shuffle=True, random_state=seed)
  expected = [
    {"train": [ids[i] for i in train], "val": [ids[i] for i in val]}
    for train, val in kfold.split(ids)
  ]
  shuffled = [str(c) for c in np.random.default_rng(seed).permutation(ids)]
  assert folds.create_splits(shuffled, k, seed=seed) == expected


def test_fewer_cases_than_folds():
  with pytest.raises(DataError, match="3 case"):
    folds.create_splits(IDS[:3], num_folds=5)


def test_load_or_create_writes_then_respects_user_file(tmp_path):
  path = tmp_path / "splits.json"
  created = folds.load_or_create_splits(path, IDS, 5, seed=3)
  assert json.loads(path.read_text()) == created
  user = [{"train": IDS[:20], "val": IDS[20:]}, {"train": IDS[3:], "val": IDS[:3]}]
  folds.write_splits(path, user)
  assert folds.load_or_create_splits(path, IDS, 2) == user
  assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


@pytest.mark.parametrize(
  "content, reason",
  [
    ([{"train": ["case_000", "ghost"], "val": ["case_001"]}], "unknown case ids"),
    ([{"train": ["case_000"], "val": ["case_001"]}] * 3, "holds 3 folds but num_folds is 2"),
    ([{"train": ["case_000"], "val": ["case_000"]}] * 2, "both train and val"),
    ({"train": []}, "non-empty list"),
    ([{"training": ["case_000"]}] * 2, "fold 0 is not"),
  ],
)
def test_bad_user_splits(tmp_path, content, reason):
  path = tmp_path / "splits_final.json"
  path.write_text(json.dumps(content))
  with pytest.raises(DataError, match=reason) as e:
    folds.load_or_create_splits(path, IDS, 2)
  assert str(path) in str(e.value)


def test_invalid_json_names_file(tmp_path):
  path = tmp_path / "splits.json"
  path.write_text("[{")
  with pytest.raises(DataError, match="invalid JSON") as e:
    folds.read_splits(path)
  assert str(path) in str(e.value)


def test_select_fold():
  splits = folds.create_splits(IDS, 5)
  train, val = folds.select_fold(splits, 2, IDS)
  assert (list(train), list(val)) == (splits[2]["train"], splits[2]["val"])
  assert folds.select_fold(splits, "2", IDS) == (train, val)
  train, val = folds.select_fold(splits, "all", IDS)
  assert train == tuple(IDS) and val == tuple(IDS)  # nnU-Net: 'all' validates on training cases
  for bad in (5, -1, "x"):
    with pytest.raises(DataError, match="fold"):
      folds.select_fold(splits, bad, IDS)
