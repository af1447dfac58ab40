"""The settings a resumed run may change, and the check that it changed no other.

Resuming continues the run saved in the workdir. A setting that changes the model, the data or
the loss would turn it into another run (and Orbax would restore arrays of the wrong shape), so
the workdir's config.json is compared with the new config: changes to fields outside
SAFE_TO_CHANGE stop the run with one line listing them as `field: old -> new`; changes to safe
ones are noted on one line. Then config.json is written with the new settings.
"""

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections

from vnet_jax.errors import ConfigError
from vnet_jax.files import write_json_atomic

# Fields (or groups, by prefix) that change how long and how visibly a run trains, where its
# files are and how it predicts, but not what it learns from or how. num_steps also moves the
# end of a cosine or poly learning-rate schedule.
SAFE_TO_CHANGE = (
  "num_steps",
  "eval_every",
  "log_every",
  "checkpoint_every",
  "keep_checkpoints",
  "inference",
  "data.data_dir",
  "data.cache_dir",
  "data.preprocess_workers",
  "data.loader_workers",
)
_ABSENT = "<absent>"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flat(value, f"{prefix}.{key}" if prefix else key))
  return flat


def changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """(field, old value, new value) of every field that differs, in field order."""
  old, new = _flat(old), _flat(new)
  return [
    (k, old.get(k, _ABSENT), new.get(k, _ABSENT))
    for k in sorted(old.keys() | new.keys())
    if old.get(k, _ABSENT) != new.get(k, _ABSENT)
  ]


def is_safe(field: str) -> bool:
  return any(field == s or field.startswith(s + ".") for s in SAFE_TO_CHANGE)


def _listed(diffs: list[tuple[str, Any, Any]]) -> str:
  return "; ".join(f"{field}: {json.dumps(a)} -> {json.dumps(b)}" for field, a, b in diffs)


def write_config(
  config: ml_collections.ConfigDict, workdir: Path, resuming: bool, fold: int | str = 0
) -> None:
  """Writes WORKDIR/config.json (process 0), with the validation `fold` beside the config
  fields (another fold is other training data); when `resuming`, first compares it with the one
  there: ConfigError listing the changed fields that are not safe to change."""
  path = Path(workdir) / "config.json"
  new = {**json.loads(config.to_json_best_effort()), "fold": str(fold)}
  if resuming and path.exists():
    try:
      old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise ConfigError(f"{path}: unreadable ({e}); cannot check the settings to resume") from None
    diffs = changes(old, new)
    unsafe = [d for d in diffs if not is_safe(d[0])]
    if unsafe:
      raise ConfigError(
        f"{path}: the run in this workdir has other settings: {_listed(unsafe)}; "
        f"resume with its settings, or start a new --workdir"
      )
    if diffs and jax.process_index() == 0:
      print(f"{path}: resuming with changed settings: {_listed(diffs)}", flush=True)
  if jax.process_index() == 0:
    write_json_atomic(path, new)
