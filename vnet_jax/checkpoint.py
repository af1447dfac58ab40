"""Orbax checkpoints of the training state and the Grain iterator, for exact resume.

Layout: WORKDIR/checkpoints/<step>/{state, data_iter}. Saves are atomic (Orbax writes a
temporary directory and renames it), so a run killed mid-save resumes from the previous step.
The latest `keep` checkpoints are kept, plus the best by validation mean Dice.
"""

from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from vnet_jax.errors import CheckpointError, one_line

METRIC = "mean_dice"


def make_manager(
  workdir: str | Path, keep: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
  policy = policies.AnyPreservationPolicy(
    [
      policies.LatestN(n=keep),
      policies.BestN(
        get_metric_fn=lambda m: m[METRIC], n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  # A reader neither creates nor cleans up; Orbax's own read_only mode would only add warnings.
  # Orbax writes a checkpoint's metrics only when best_fn is set; without them nothing is "best".
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    best_fn=lambda m: m[METRIC],
    best_mode="max",
    cleanup_tmp_directories=not read_only,
    create=not read_only,
  )
  return ocp.CheckpointManager(
    Path(workdir).absolute() / "checkpoints", options=options, item_names=("state", "data_iter")
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iter=None,
  mean_dice: float | None = None,
) -> None:
  """Saves an unreplicated state (host arrays) and, when given, the Grain iterator position."""
  items = {"state": ocp.args.StandardSave(jax.device_get(state))}
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
  metrics = None if mean_dice is None else {METRIC: float(mean_dice)}
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """Step with the highest validation mean Dice; None when no checkpoint has metrics."""
  scored = [(manager.metrics(s) or {}).get(METRIC) for s in manager.all_steps()]
  candidates = [(d, s) for d, s in zip(scored, manager.all_steps()) if d is not None]
  return max(candidates)[1] if candidates else None


def resolve_step(manager: ocp.CheckpointManager, which: str | int) -> int:
  """'latest', 'best' (falls back to latest when nothing was evaluated) or a step number."""
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"{manager.directory}: no checkpoint found")
  if which == "latest":
    return manager.latest_step()
  if which == "best":
    best = best_step(manager)
    return manager.latest_step() if best is None else best
  try:
    step = int(which)
  except ValueError:
    raise CheckpointError(
      f"{manager.directory}: checkpoint {which!r} is not 'best', 'latest' or a step number"
    ) from None
  if step not in steps:
    raise CheckpointError(
      f"{manager.directory}: no checkpoint at step {step} (have {sorted(steps)})"
    )
  return step


def _restore(manager: ocp.CheckpointManager, step: int, **items) -> Any:
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{manager.directory / str(step)}: cannot restore ({one_line(e)})") from e


def restore(manager: ocp.CheckpointManager, step: int, template: Any, data_iter=None) -> Any:
  """Restores into an unreplicated template (replicate afterwards); moves data_iter in place."""
  items = {"state": ocp.args.StandardRestore(jax.device_get(template))}
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  return jax.tree_util.tree_map(np.asarray, _restore(manager, step, **items)["state"])


def restore_variables(manager: ocp.CheckpointManager, step: int, template: Any) -> dict:
  """Only {"params", "batch_stats"} of a saved train state, for inference: the optimizer state
  and the data-iterator position stay on disk. `template` holds arrays or ShapeDtypeStructs
  with those two keys (e.g. `jax.eval_shape` of the model's init)."""
  item = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), dict(template))
  state = ocp.args.PyTreeRestore(item=item, partial_restore=True)
  return jax.tree_util.tree_map(np.asarray, dict(_restore(manager, step, state=state)["state"]))


def load_variables(workdir: str | Path, which: str | int, template: Any) -> tuple[int, dict]:
  """(step, {"params", "batch_stats"}) of a run's checkpoint `which` ('best', 'latest' or a
  step, as `resolve_step`), read without creating or cleaning anything in `workdir`."""
  manager = make_manager(workdir, read_only=True)
  step = resolve_step(manager, which)
  return step, restore_variables(manager, step, template)
