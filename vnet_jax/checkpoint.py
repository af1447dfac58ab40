"""Orbax checkpoints of the training state and the Grain iterator, for exact resume.

Layout: WORKDIR/checkpoints/<step>/{state, data_iter}. Saves are atomic (Orbax writes a
temporary directory and renames it), so a run killed mid-save resumes from the previous step.
The latest `keep` checkpoints are kept, plus the best by validation mean Dice.

Damaged checkpoints: one that cannot be read back although it holds the arrays the model needs
(a truncated or missing file, unreadable metadata: what a crash, a full disk or an incomplete
copy leaves) is renamed `checkpoints/<step>.damaged-<n>` (kept for inspection, no longer a
checkpoint to Orbax) with a one-line warning, and the next one is used (`restore_intact`,
`load_variables`). A checkpoint of another model (other arrays) is not damage: CheckpointError.

A save that fails (full disk, no permission) is a WriteError naming `checkpoints/<step>`; the
checkpoints saved before it stay as they were.
"""

import asyncio
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from vnet_jax import hosts
from vnet_jax.errors import CheckpointError, WriteError, one_line, warn

METRIC = "mean_dice"
# What reading a damaged checkpoint raises: tensorstore's errors (a truncated or missing data
# file) and unparsable JSON are ValueErrors; a missing item file can be an OSError.
_READ_ERRORS = (ValueError, KeyError, OSError)
_SCALARS = (int, float, bytes, np.number)  # Orbax's default ScalarHandler types


async def _all_settled(calls) -> list:
  """Awaits every call (each returns a list of one), then raises the first failure."""
  done = await asyncio.gather(*calls, return_exceptions=True)
  for result in done:
    if isinstance(result, BaseException):
      raise result
  return [result[0] for result in done]


class _SettledNumpyHandler(ocp.type_handlers.NumpyHandler):
  """Orbax's handler of host arrays, opening and reading each array as a request of its own,
  and raising only once every request has finished.

  Orbax's gathers them and raises at the first failure (a truncated file), closing its event
  loop while tensorstore still reads the other arrays; when those reads complete they call into
  the closed loop ("RuntimeError: Event loop is closed" tracebacks, often at exit).
  """

  async def metadata(self, infos):
    parent = super()
    return await _all_settled(parent.metadata([info]) for info in infos)

  async def deserialize(self, infos, args=None):
    args = args or [ocp.RestoreArgs()] * len(infos)
    parent = super()
    return await _all_settled(parent.deserialize([info], [arg]) for info, arg in zip(infos, args))


class _SettledScalarHandler(ocp.type_handlers.ScalarHandler, _SettledNumpyHandler):
  """Orbax's handler of scalars (e.g. a fresh state's step) on the settled reads above."""


@functools.cache
def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  settled = {np.ndarray: _SettledNumpyHandler(), **dict.fromkeys(_SCALARS, _SettledScalarHandler())}
  return ocp.type_handlers.create_type_handler_registry(
    *(
      (t, settled.get(t) or ocp.type_handlers.get_type_handler(t))
      for t in ocp.type_handlers.supported_types()
    )
  )


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  state = ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())
  data_iter = grain.checkpoint.CheckpointHandler()
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeSave, state)
  registry.add("state", ocp.args.PyTreeRestore, state)
  registry.add("data_iter", grain.checkpoint.CheckpointSave, data_iter)
  registry.add("data_iter", grain.checkpoint.CheckpointRestore, data_iter)
  return registry


def _reason(e: BaseException) -> str:
  """Why a read or write failed, short: the OS's words when known, else the last clause of a
  tensorstore message (its status code kept) or the message."""
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  text = " ".join(str(e).split())
  if code := re.search(r"\[os_error_code='(\d+)'\]", text):
    return os.strerror(int(code.group(1)))
  text = re.sub(r"\s*\[[a-z_ ]+=.*\]$", "", text)  # tensorstore's spec and source suffixes
  if status := re.match(r"([A-Z_]+): .*: (.+)$", text):
    return one_line(f"{status.group(1)}: {status.group(2)}")
  return one_line(e)


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, whose failed saves, reported when they are waited for, name their step."""

  saving: int | None = None

  def wait_until_finished(self) -> None:
    try:
      super().wait_until_finished()
    except (OSError, ValueError) as e:
      raise _save_failed(self.directory, self.saving, e) from e


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
  directory = Path(workdir).absolute() / "checkpoints"
  # Orbax reads every checkpoint's metrics when it starts and fails on one it cannot parse.
  for metrics in sorted(directory.glob("*/metrics/metrics")):
    step = metrics.parent.parent.name
    try:
      json.loads(metrics.read_text())
    except (OSError, ValueError) as e:
      if step.isdigit() and jax.process_index() == 0:
        _move_aside(directory, int(step), f"metrics: {one_line(e)}")
  hosts.wait_for_all("vnet_jax checkpoint metrics checked")
  return _Manager(directory, options=options, handler_registry=_handler_registry())


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iter=None,
  mean_dice: float | None = None,
) -> None:
  """Saves an unreplicated state (host arrays) and, when given, the Grain iterator position.

  The arrays are written in the background; a failure (full disk) raises a WriteError naming
  the step, here or at the next save or `manager.wait_until_finished()`.
  """
  items = {"state": ocp.args.PyTreeSave(jax.device_get(state))}
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
  metrics = None if mean_dice is None else {METRIC: float(mean_dice)}
  manager.wait_until_finished()  # an earlier save's failure is reported under its own step
  manager.saving = step
  try:
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
  except (OSError, ValueError) as e:
    raise _save_failed(manager.directory, step, e) from e


def _save_failed(directory: Path, step: int | None, e: Exception) -> WriteError:
  return WriteError(f"{directory / str(step)}: cannot save the checkpoint ({_reason(e)})")


def best_step(manager: ocp.CheckpointManager, steps) -> int | None:
  """Of `steps`, the one with the highest validation mean Dice; None when none has metrics."""
  scored = [((manager.metrics(s) or {}).get(METRIC), s) for s in steps]
  candidates = [(d, s) for d, s in scored if d is not None]
  return max(candidates)[1] if candidates else None


def resolve_step(manager: ocp.CheckpointManager, which: str | int, skip=()) -> int:
  """'latest', 'best' (falls back to latest when nothing was evaluated) or a step number,
  among the checkpoints not in `skip`."""
  steps = [s for s in manager.all_steps() if s not in skip]
  if not steps:
    raise CheckpointError(f"{manager.directory}: no checkpoint found")
  if which == "latest":
    return max(steps)
  if which == "best":
    best = best_step(manager, steps)
    return max(steps) if best is None else best
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


def _names(tree: Any) -> dict[str, tuple]:
  """'params/Conv3D_0/kernel' -> shape, for every array of a state or of its saved metadata."""
  key = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(map(key, path)): tuple(getattr(x, "shape", ())) for path, x in leaves}


def _mismatch(directory: Path, template: Any, variables_only: bool) -> str | None:
  """How the checkpoint's arrays differ from the template's (None: they agree); a read error
  when its metadata cannot be read."""
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())
  saved = _names(handler.metadata(directory / "state"))
  wanted = _names(jax.eval_shape(lambda: template))
  for name, shape in wanted.items():
    if name not in saved:
      return f"it has no {name}"
    if saved[name] != shape:
      return f"{name} is {saved[name]} there, {shape} here"
  extra = sorted(set(saved) - set(wanted))
  return None if variables_only or not extra else f"it has {extra[0]}, this model does not"


def _read(
  manager: ocp.CheckpointManager, step: int, template: Any, data_iter, variables_only: bool
) -> Any:
  """The restored state; CheckpointError if the checkpoint holds other arrays than `template`
  (Orbax would restore them whatever their shapes), a read error if it is damaged."""
  path = Path(manager.directory) / str(step)
  if mismatch := _mismatch(path, template, variables_only):
    raise CheckpointError(
      f"{path}: holds another model than this config builds ({mismatch}); was the config "
      f"changed since it was saved?"
    )
  host = lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
  item = jax.tree_util.tree_map(host, jax.device_get(template))
  items = {"state": ocp.args.PyTreeRestore(item=item, partial_restore=variables_only)}
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))["state"]
  return jax.tree_util.tree_map(np.asarray, restored)


def restore(manager: ocp.CheckpointManager, step: int, template: Any, data_iter=None) -> Any:
  """Restores into an unreplicated template (arrays or ShapeDtypeStructs; replicate
  afterwards); moves data_iter in place. CheckpointError if the checkpoint cannot be read."""
  try:
    return _read(manager, step, template, data_iter, variables_only=False)
  except _READ_ERRORS as e:
    raise CheckpointError(f"{manager.directory / str(step)}: cannot restore ({_reason(e)})") from e


def _move_aside(directory: Path, step: int, reason: str) -> None:
  """Renames checkpoints/<step> to <step>.damaged-<n> (call on process 0), with a warning."""
  src = directory / str(step)
  n = 1
  while (dst := directory / f"{step}.damaged-{n}").exists():
    n += 1
  try:
    src.rename(dst)
    warn(f"{src}: damaged checkpoint ({reason}); moved aside to {dst.name}")
  except FileNotFoundError:
    pass  # gone meanwhile (another run's clean-up): nothing to move
  except OSError as e:
    warn(f"{src}: damaged checkpoint ({reason}), left in place ({e.strerror}); skipped")


def restore_intact(
  manager: ocp.CheckpointManager,
  which: str | int,
  template: Any,
  data_iter=None,
  variables_only: bool = False,
) -> tuple[int, Any]:
  """(step, restored state) of checkpoint `which` (as `resolve_step`), or, when it is damaged,
  of the next one ('latest': the newest intact one, 'best': the best intact one): each damaged
  one is moved aside with a warning. With `variables_only`, `template` is
  {"params", "batch_stats"} and only those are read. CheckpointError when no intact checkpoint
  is left, when the step asked for by number is damaged, or when a checkpoint holds another
  model than `template`."""
  skip = set()
  while True:
    try:
      step = resolve_step(manager, which, skip)
    except CheckpointError:
      if not skip:
        raise
      raise CheckpointError(
        f"{manager.directory}: no intact checkpoint left (damaged: steps "
        f"{', '.join(map(str, sorted(skip)))}, moved aside); start again in a new --workdir"
      ) from None
    error = None
    try:
      restored = _read(manager, step, template, data_iter, variables_only)
    except _READ_ERRORS as e:
      error = e
    if not hosts.any_process(error is not None):
      return step, restored
    reason = _reason(error) if error else "unreadable on another host"
    if jax.process_index() == 0:
      _move_aside(Path(manager.directory), step, reason)
    hosts.wait_for_all(f"vnet_jax damaged checkpoint {step} moved")
    manager.reload()
    skip.add(step)
    if which not in ("latest", "best"):
      raise CheckpointError(
        f"{manager.directory / str(step)}: damaged ({reason}); moved aside, see the warning"
      )


def resume(manager: ocp.CheckpointManager, template: Any, data_iter) -> tuple[int, Any]:
  """(0, template) without checkpoints, else the newest intact checkpoint's (step, state),
  data_iter moved to its position (`restore_intact`)."""
  if not manager.all_steps():
    return 0, template
  step, state = restore_intact(manager, "latest", template, data_iter)
  print(f"resumed from {manager.directory} at step {step}", flush=True)
  return step, state


def load_variables(workdir: str | Path, which: str | int, template: Any) -> tuple[int, dict]:
  """(step, {"params", "batch_stats"}) of a run's checkpoint `which` ('best', 'latest' or a
  step, as `resolve_step`), without creating or cleaning anything in `workdir`; a damaged
  checkpoint is moved aside and the next one read, as in `restore_intact`."""
  with make_manager(workdir, read_only=True) as manager:
    return restore_intact(manager, which, dict(template), variables_only=True)
