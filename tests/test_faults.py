"""Faults survived during training, provoked for real: a second run on a workdir in use, a full
disk while saving a checkpoint, a lock holder killed with SIGKILL, a truncated checkpoint file,
SIGTERM mid-run, other settings on resume. One story shares the runs: A trains (B is refused
meanwhile) until its disk is full; a process holding the lock is killed; A's newest checkpoint
is damaged; D resumes and is preempted; E resumes to the end and must match A."""

import asyncio
import builtins
import contextlib
import errno
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest

from tests.conftest import make_tiny_config, subprocess_env, tiny_flags
from vnet_jax import checkpoint, metric_writers, preemption, report, runtime, train
from vnet_jax.errors import CheckpointError, ConfigError, TrainingError, WriteError
from vnet_jax.model import build_model
from vnet_jax.workdir_lock import LOCK_FILE, WorkdirLock

ROOT = Path(__file__).resolve().parent.parent
FOREVER = 10_000  # steps: the runs below end by a signal, never by finishing


def _popen(args, env=None, **popen) -> subprocess.Popen:
  # Started on huge pages already, so the command does not restart itself.
  env = env or subprocess_env(GLIBC_TUNABLES=runtime.HUGE_PAGES_TUNABLE + "=1")
  return subprocess.Popen(
    [sys.executable, "-m", "vnet_jax.main", *args], env=env, cwd=ROOT, text=True, **popen
  )


def _flags(work, data, cache, **overrides) -> list[str]:
  return ["--experiment=flare22", f"--workdir={work}", *tiny_flags(data, cache, **overrides)]


def _losses(work) -> list[tuple[int, float]]:
  """(step, loss) of every line of metrics.jsonl, in order."""
  lines = (Path(work) / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _clean(stderr: str) -> None:
  assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr


def _files(path) -> dict[str, int]:
  return {str(p.relative_to(path)): p.stat().st_size for p in Path(path).rglob("*")}


def _steps(work) -> list[int]:
  return sorted(int(p.name) for p in (Path(work) / "checkpoints").iterdir() if p.name.isdigit())


# ---------------------------------------------------------------------------- the story

# Imported by the subprocess (first on its path): opening a file whose path contains PATTERN for
# writing fails with ENOSPC once AFTER such opens have succeeded, like a disk that fills up.
_FULL_DISK = textwrap.dedent("""
  import builtins, errno, io, os
  _pattern, _after = os.environ["VNET_TEST_ENOSPC"].rsplit(":", 1)
  _left, _open = [int(_after)], io.open

  def _open_on_a_full_disk(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and _pattern in str(file):
      if _left[0] <= 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
      _left[0] -= 1
    return _open(file, mode, *args, **kwargs)

  builtins.open = io.open = _open_on_a_full_disk
""")


# Lock a workdir as a run does, then wait to be killed.
_HOLDER = "import sys, time\nfrom vnet_jax.workdir_lock import WorkdirLock\n" + (
  "WorkdirLock(sys.argv[1]).__enter__()\nprint('holding', flush=True)\ntime.sleep(300)\n"
)


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory, tiny_dataset):
  """A trains until its disk is full at the checkpoint of step 14 (the 7th of the iterator
  position); B, a second run started while A runs (with another log interval), is refused."""
  tmp = tmp_path_factory.mktemp("faults")
  work, cache, site = tmp / "run", tmp / "cache", tmp / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(_FULL_DISK)
  env = subprocess_env(
    GLIBC_TUNABLES=runtime.HUGE_PAGES_TUNABLE + "=1",
    PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]),
    VNET_TEST_ENOSPC="data_iter:6",
  )
  args = _flags(work, tiny_dataset, cache, num_steps=FOREVER)
  a = _popen(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 120  # config.json is written once A holds the lock
  while not (work / "config.json").exists() and a.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  config = (work / "config.json").read_text()
  try:
    b = make_tiny_config(tiny_dataset, cache, num_steps=FOREVER, log_every=5)
    train.train_and_evaluate(b, work)
    refused = None
  except TrainingError as e:
    refused = str(e)
  assert a.poll() is None, "A ended before B was refused"
  assert (work / "config.json").read_text() == config, "B wrote A's config.json"
  out, err = a.communicate(timeout=300)
  return {
    "work": work,
    "data": tiny_dataset,
    "cache": cache,
    "args": args,
    "a_pid": a.pid,
    "a": subprocess.CompletedProcess(a.args, a.returncode, out, err),
    "refused": refused,
    "a_losses": _losses(work),
    "a_steps": _steps(work),
    "a_lock": (work / LOCK_FILE).exists(),
  }


@pytest.fixture(scope="module")
def preempted(full_disk):
  """A process holding the workdir's lock killed with SIGKILL; A's newest checkpoint damaged
  (a data file truncated); then D resumes with A's command and gets SIGTERM while compiling."""
  work = full_disk["work"]
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLDER, str(work)], env=subprocess_env(), stdout=subprocess.PIPE
  )
  assert holder.stdout.readline() == b"holding\n"
  holder.kill()
  holder.wait()
  newest = max(_steps(work))
  data = max((work / "checkpoints" / str(newest)).rglob("d/*"), key=lambda p: p.stat().st_size)
  os.truncate(data, 10)
  before = _files(work / "checkpoints" / str(newest))
  d = _popen(full_disk["args"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  out = []
  for line in d.stdout:
    out.append(line)
    if line.startswith("resumed from"):
      d.send_signal(signal.SIGTERM)
      break
  rest, err = d.communicate(timeout=300)
  result = subprocess.CompletedProcess(d.args, d.returncode, "".join(out) + rest, err)
  return {**full_disk, "holder": holder.pid, "newest": newest, "damaged": before, "d": result}


@pytest.fixture(scope="module")
def resumed(preempted):
  """E resumes D's checkpoint in this process, two steps further; its stdout."""
  work, a = preempted["work"], dict(preempted["a_losses"])
  stopped = max(_steps(work))
  end = min(stopped + 2, max(a))
  assert end > stopped, f"A logged up to step {max(a)}, D stopped at {stopped}"
  config = make_tiny_config(preempted["data"], preempted["cache"], num_steps=end)
  out = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
    mp.setattr(report, "make_report", lambda workdir: "not made in this test")
    summary = train.train_and_evaluate(config, work)
  return {**preempted, "stopped": stopped, "end": end, "summary": summary, "e": out.getvalue()}


@pytest.mark.slow
def test_a_second_run_on_a_workdir_in_use_refuses_at_once_naming_the_holder(full_disk):
  lock = full_disk["work"] / LOCK_FILE
  assert full_disk["refused"] is not None and full_disk["refused"].startswith(
    f"{lock}: the workdir is in use by pid {full_disk['a_pid']} on host {socket.gethostname()} "
  )


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_ones_before(full_disk):
  a, work = full_disk["a"], full_disk["work"]
  assert a.returncode == 1
  _clean(a.stderr)
  assert a.stderr.strip().splitlines()[-1] == (
    f"error: {work / 'checkpoints' / '14'}: cannot save the checkpoint (No space left on device)"
  )
  assert [s for s, _ in full_disk["a_losses"]] == list(range(1, 15))
  assert full_disk["a_steps"] == [8, 10, 12] and not full_disk["a_lock"]


@pytest.mark.slow
def test_the_lock_of_a_killed_holder_is_taken_over_with_a_warning_and_released(preempted):
  err = preempted["d"].stderr
  lock = preempted["work"] / LOCK_FILE
  assert (
    f"warning: {lock}: taking over the lock of a run that no longer runs: "
    f"pid {preempted['holder']} on host {socket.gethostname()}" in err
  )
  assert not lock.exists()  # D released it when it stopped


@pytest.mark.slow
def test_a_damaged_checkpoint_is_moved_aside_and_the_one_before_resumes_exactly(preempted):
  work, newest, d = preempted["work"], preempted["newest"], preempted["d"]
  _clean(d.stderr)
  path = work / "checkpoints" / str(newest)
  assert f"warning: {path}: damaged checkpoint (OUT_OF_RANGE: " in d.stderr
  assert f"moved aside to {newest}.damaged-1\n" in d.stderr
  # Nothing deleted: every file of it, the truncated one included, under its new name.
  assert _files(work / "checkpoints" / f"{newest}.damaged-1") == preempted["damaged"]
  assert f"resumed from {work / 'checkpoints'} at step {newest - 2}\n" in d.stdout
  # D dropped A's lines after that step and recomputed those steps exactly as A computed them.
  a, losses = dict(preempted["a_losses"]), _losses(work)
  assert len({step for step, _ in losses}) == len(losses)
  d_losses = [(step, loss) for step, loss in losses if step > newest - 2]
  assert d_losses and all(loss == a[step] for step, loss in d_losses), d_losses


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_143_with_the_command_to_resume(preempted):
  d, work = preempted["d"], preempted["work"]
  assert d.returncode == 143, d.stderr[-2000:]
  stopped = _losses(work)[-1][0]  # D's last step
  saved = work / "checkpoints" / str(stopped)
  last = d.stderr.strip().splitlines()[-1]
  head = f"stopped by SIGTERM after step {stopped}, checkpoint saved in {saved}; resume with: "
  assert last.startswith(head)
  assert shlex.split(last[len(head) :])[1:] == ["-m", "vnet_jax.main", *preempted["args"]]
  assert max(_steps(work)) == stopped


@pytest.mark.slow
def test_the_resumed_run_ends_with_the_loss_of_an_uninterrupted_one(resumed):
  work, end = resumed["work"], resumed["end"]
  assert f"resumed from {work / 'checkpoints'} at step {resumed['stopped']}\n" in resumed["e"]
  # num_steps is safe to change when resuming: noted on one line, then written to config.json.
  assert f"resuming with changed settings: num_steps: {FOREVER} -> {end}\n" in resumed["e"]
  assert json.loads((work / "config.json").read_text())["num_steps"] == end
  assert _losses(work)[-1] == (end, dict(resumed["a_losses"])[end])
  assert resumed["summary"]["step"] == end


@pytest.mark.slow
def test_changed_model_settings_refuse_to_resume_with_the_difference(resumed):
  work = resumed["work"]
  config = (work / "config.json").read_text()
  other = make_tiny_config(resumed["data"], resumed["cache"], patch_size=(16, 16, 16))
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(other, work)
  assert str(e.value) == (
    f"{work / 'config.json'}: the run in this workdir has other settings: "
    f"patch_size: [8, 16, 16] -> [16, 16, 16]; resume with its settings, or start a new --workdir"
  )
  assert (work / "config.json").read_text() == config
  assert not (work / LOCK_FILE).exists()
  with pytest.raises(ConfigError, match='fold: "0" -> "1"'):  # another fold: other training data
    train.train_and_evaluate(other, work, fold=1)
  assert (work / "config.json").read_text() == config


def _template(config, num_classes=14) -> dict:
  model = build_model(config, num_classes, 1, bn_axis_name=train.AXIS)
  state = jax.eval_shape(lambda: train.create_train_state(config, model))
  return {"params": state.params, "batch_stats": state.batch_stats}


@pytest.mark.slow
def test_eval_and_predict_fall_back_to_intact_checkpoints_until_none_is_left(
  resumed, tmp_path, capsys
):
  work = tmp_path / "run"
  shutil.copytree(resumed["work"], work)
  d = work / "checkpoints"
  steps = _steps(work)
  assert steps[-1] == resumed["end"] and len(steps) == 3
  best, latest, oldest = steps[-1], steps[-2], steps[-3]
  # The best (the only one validated) has a truncated metrics file: --mode=eval validates the
  # latest of the others.
  os.truncate(d / str(best) / "metrics" / "metrics", 5)
  config = make_tiny_config(resumed["data"], resumed["cache"], num_steps=resumed["end"])
  summary = train.train_and_evaluate(config, work, mode="eval")
  assert summary["step"] == latest
  assert f"warning: {d / str(best)}: damaged checkpoint (metrics: " in capsys.readouterr().err
  # Predict reads weights only; one of the latest's data files is missing.
  next(p for p in (d / str(latest)).rglob("d/*") if p.stat().st_size > 1000).unlink()
  template = _template(config)
  step, variables = checkpoint.load_variables(work, "latest", template)
  assert step == oldest and set(variables) == {"params", "batch_stats"}
  assert f"warning: {d / str(latest)}: damaged checkpoint (" in capsys.readouterr().err
  # Another model's weights are not damage: one line, nothing moved.
  other = _template(make_tiny_config("", "", **{"model.filters": (4, 16)}))
  with pytest.raises(CheckpointError, match=r"holds another model than this config builds"):
    checkpoint.load_variables(work, "latest", other)
  assert _steps(work) == [oldest]
  # The last one's metadata does not parse: one line, and every checkpoint still on disk.
  (d / str(oldest) / "state" / "_METADATA").write_text('{"tree_metadata": {')
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_variables(work, "latest", template)
  assert str(e.value) == (
    f"{d}: no intact checkpoint left (damaged: steps {oldest}, moved aside); start again in a "
    f"new --workdir"
  )
  assert _steps(work) == []
  moved = sorted(int(p.name.split(".damaged-")[0]) for p in d.iterdir())
  assert moved == sorted([resumed["newest"], *steps])


def test_a_failed_read_raises_only_once_the_other_reads_have_finished(monkeypatch):
  # Orbax's own handler raises at the first failure while tensorstore goes on reading the
  # others, into an event loop Orbax then closes: "Event loop is closed" tracebacks at exit.
  finished = []

  async def read(self, infos, args=None):
    (info,) = infos  # one request per array
    if info == "truncated":
      raise ValueError("OUT_OF_RANGE: Requested byte range [0, 3835) is not valid")
    await asyncio.sleep(0.05)
    finished.append(info)
    return [info]

  monkeypatch.setattr(ocp.type_handlers.NumpyHandler, "deserialize", read)
  handler = checkpoint._SettledNumpyHandler()
  with pytest.raises(ValueError, match="OUT_OF_RANGE"):
    asyncio.run(handler.deserialize(["a", "truncated", "b"]))
  assert sorted(finished) == ["a", "b"]


# ---------------------------------------------------------------------------- write failures


class _FullDiskFile:
  """A file that takes the first half of a write, then fails with ENOSPC."""

  def __init__(self, f):
    self._f, self._wrote = f, False

  def write(self, data):
    if self._wrote:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    self._wrote = True
    return self._f.write(data[: len(data) // 2])

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def _full_disk_under(folder: str):
  """An `open` that fails with ENOSPC when writing below a folder of that name."""
  real = io.open

  def full(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and f"{os.sep}{folder}{os.sep}" in str(file):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return real(file, mode, *args, **kwargs)

  return full


def _metrics(work) -> Path:
  path = work / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (1, 2, 3)))
  return path


def test_a_full_disk_while_appending_metrics_takes_the_half_written_line_back(
  tmp_path, monkeypatch
):
  metrics = _metrics(tmp_path)
  before = metrics.read_bytes()
  real_open = Path.open

  def half_then_full(path, *args, **kwargs):
    f = real_open(path, *args, **kwargs)
    return _FullDiskFile(f) if path == metrics else f

  monkeypatch.setattr(Path, "open", half_then_full)
  with pytest.raises(WriteError) as e:
    metric_writers.JsonlWriter(metrics).write_scalars(4, {"loss": 0.25})
  assert str(e.value) == f"{metrics}: cannot write (No space left on device)"
  assert metrics.read_bytes() == before


def test_a_full_disk_while_making_the_report_keeps_the_previous_one(tmp_path, monkeypatch):
  _metrics(tmp_path)
  previous = {tmp_path / "report.html": b"<html>before</html>"}
  previous[tmp_path / "plots" / report.CURVES_PNG] = b"the curves before"
  (tmp_path / "plots").mkdir()
  for path, content in previous.items():
    path.write_bytes(content)
  monkeypatch.setattr(builtins, "open", _full_disk_under("plots"))
  monkeypatch.setattr(io, "open", _full_disk_under("plots"))
  with pytest.raises(WriteError) as e:
    report.make_report(tmp_path)
  plot = re.escape(str(tmp_path / "plots")) + r"/\w+\.png"
  assert re.fullmatch(plot + r": cannot write \(No space left on device\)", str(e.value))
  assert {p: p.read_bytes() for p in previous} == previous


# ---------------------------------------------------------------------------- signals, hosts, locks


def test_a_second_signal_exits_at_once_after_releasing_the_lock(monkeypatch, capfd):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers are installed from the main thread only")
  if signal.SIG_IGN in (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)):
    pytest.skip("started with the signals ignored (nohup), as the run would keep them")
  exits, released = [], []
  monkeypatch.setattr(os, "_exit", exits.append)
  handler = signal.getsignal(signal.SIGTERM)
  stop = preemption.StopRequest(before_exit=lambda: released.append(True))
  try:
    assert not stop.agreed()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.agreed() and not exits and not released  # the first one: stop after the step
    os.kill(os.getpid(), signal.SIGINT)
    assert released == [True] and exits == [128 + signal.SIGINT]
    assert capfd.readouterr().err.splitlines()[-1].startswith("SIGINT again: exiting now")
  finally:
    stop.close()
  assert signal.getsignal(signal.SIGTERM) is handler


def test_hosts_stop_together_one_step_after_the_signal(monkeypatch):
  # Several hosts: the flags go through a collective read one step later (here over this
  # host's devices only), so a host that got the signal stops when all the others learn of it.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  stop = preemption.StopRequest()
  try:
    assert [stop.agreed(), stop.agreed()] == [False, False]
    stop.signum = signal.SIGTERM  # what the handler sets, on this host only
    assert [stop.agreed(), stop.agreed()] == [False, True]
  finally:
    stop.close()


def test_a_lock_held_from_another_host_is_never_taken_over(tmp_path):
  # Even with a pid that runs nowhere here: on its host it may.
  done = subprocess.Popen(["true"])
  done.wait()
  holder = {"host": "node-17", "pid": done.pid, "started": "2026-11-30 05:00", "command": "python"}
  (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
  refused = pytest.raises(TrainingError, match=rf"in use by pid {done.pid} on host node-17 since")
  with refused, WorkdirLock(tmp_path):
    pass
  assert json.loads((tmp_path / LOCK_FILE).read_text()) == holder
