"""Where training's numbers go: metric writers in the style of CLU's `metric_writers`, and the
training log that feeds them.

CLU's own package imports TensorFlow for its summary writer, so the few writers the package
needs are here, with CLU's interface (`write_scalars(step, values)`, `flush()`, `close()`):
JSON lines for `metrics.jsonl` and `eval/history.jsonl`, and TensorBoard event files
(tensorboardX). Values may be nested mappings (e.g. per-class Dice): JSON lines keep the
nesting, TensorBoard joins the keys with "/".
"""

import abc
import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vnet_jax.errors import TrainingError
from vnet_jax.files import reporting_write_errors, write_text_atomic


class MetricWriter(abc.ABC):
  @abc.abstractmethod
  def write_scalars(self, step: int, values: Mapping[str, Any]) -> None: ...

  def close(self) -> None:  # a writer without resources has nothing to close
    return None


class JsonlWriter(MetricWriter):
  """Appends one line `{"step": step, **values}` per call; a line that cannot be written whole
  (full disk) is taken back, and the WriteError names the file.

  `resume_step`: a resumed run's starting step. Lines of later steps, written before the run
  was stopped and about to be computed again, are dropped, so each step has one line.
  """

  def __init__(self, path: str | Path, resume_step: int | None = None):
    self.path = Path(path)
    with reporting_write_errors(self.path):
      self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is not None and self.path.exists():
      lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines(True)
      kept = [x for x in lines if (step := _step_of(x)) is not None and step <= resume_step]
      if len(kept) < len(lines):
        write_text_atomic(self.path, "".join(kept))

  def write_scalars(self, step: int, values: Mapping[str, Any]) -> None:
    line = memoryview((json.dumps({"step": step, **values}) + "\n").encode())
    with reporting_write_errors(self.path), self.path.open("ab", buffering=0) as f:
      end = f.seek(0, os.SEEK_END)
      try:
        while line:  # unbuffered: a short write is retried, a failed one raises here
          line = line[f.write(line) :]
      except OSError:
        with contextlib.suppress(OSError):
          f.truncate(end)
        raise


def _step_of(line: str) -> int | None:
  """The step of a whole JSON line; None for a half-written or foreign one."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  step = record.get("step") if isinstance(record, dict) else None
  return step if isinstance(step, int) else None


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  flat = {}
  for key, value in values.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = float(value)
  return flat


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files under `logdir` (one writer per folder: two would share a file).

  Written in this thread with tensorboardX's `EventsWriter`: its `SummaryWriter` writes from a
  thread of its own, where a failing write (full disk) would end in a traceback and lost events
  rather than in a WriteError here.
  """

  def __init__(self, logdir: str | Path):
    from tensorboardX.event_file_writer import EventsWriter

    self.logdir = Path(logdir)
    with reporting_write_errors(self.logdir):
      self.logdir.mkdir(parents=True, exist_ok=True)
      self._events = EventsWriter(str(self.logdir / "events"))

  def write_scalars(self, step: int, values: Mapping[str, Any]) -> None:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar

    now = time.time()
    with reporting_write_errors(self.logdir):
      for tag, value in _flatten(values).items():
        self._events.write_event(Event(wall_time=now, step=step, summary=scalar(tag, value)))
      self._events.flush()  # written (or failed) now, and visible to TensorBoard

  def close(self) -> None:
    with reporting_write_errors(self.logdir):
      self._events.close()


class TrainingLog:
  """What a run reports: training metrics (`metrics.jsonl`, TensorBoard `train/...`, a progress
  line), validation summaries (`eval/history.jsonl`, TensorBoard `eval/...`).

  Per-step device metrics stay unfetched until a flush, so logging never waits on the device
  between two steps. Only process 0 writes.
  """

  def __init__(self, workdir: Path, schedule, num_steps: int, start_step: int):
    self.schedule = schedule
    self.num_steps = num_steps
    self.pending: list[tuple[int, Any]] = []
    self.last_time, self.last_step = time.time(), start_step
    self.is_main = jax.process_index() == 0
    if self.is_main:
      self.train = JsonlWriter(workdir / "metrics.jsonl", start_step)
      self.eval = JsonlWriter(workdir / "eval" / "history.jsonl", start_step)
      self.tensorboard = TensorBoardWriter(workdir / "tensorboard")

  def add(self, step: int, device_metrics) -> None:
    self.pending.append((step, device_metrics))

  def flush(self, log: bool) -> None:
    """Fetches pending metrics; raises at the first non-finite loss; logs the last step if asked."""
    if not self.pending:
      return
    fetched = jax.device_get([jax.tree_util.tree_map(lambda x: x[0], m) for _, m in self.pending])
    for (step, _), values in zip(self.pending, fetched):
      if not np.isfinite(values["loss"]):
        raise TrainingError(
          f"non-finite loss ({values['loss']}) at step {step}; the run stops here and "
          f"the last checkpoint before it is kept"
        )
    step, values = self.pending[-1][0], fetched[-1]
    self.pending = []
    if not (log and self.is_main):
      return
    now = time.time()
    steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    record = {
      **{k: float(v) for k, v in values.items()},
      "learning_rate": float(self.schedule(step - 1)),
      "steps_per_s": steps_per_s,
    }
    self.train.write_scalars(step, record)
    self.tensorboard.write_scalars(step, {"train": record})
    eta = (self.num_steps - step) / max(steps_per_s, 1e-9)
    print(
      f"step {step}/{self.num_steps}  loss {record['loss']:.4f}  "
      f"dice_loss {record['dice_loss']:.4f}  "
      f"acc {record['accuracy']:.3f}  {steps_per_s:.2f} steps/s  ETA {eta / 60:.1f} min",
      flush=True,
    )

  def add_eval(self, step: int, summary: dict) -> None:
    if self.is_main:
      per_class = {name: v["dice"] for name, v in summary["per_class"].items()}
      values = {"mean_dice": summary["mean_dice"], "per_class": per_class}
      self.eval.write_scalars(step, values)
      self.tensorboard.write_scalars(step, {"eval": values})

  def close(self) -> None:
    if self.is_main:
      self.tensorboard.close()
