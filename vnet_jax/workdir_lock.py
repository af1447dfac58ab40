"""One run per workdir: WORKDIR/run.lock names the run that holds it (host, pid, start time,
command) while it runs.

Process 0 creates the workdir and takes the lock atomically (the complete file is hard-linked
into place, which fails when one exists), before the run writes anything. A second run refuses
at once with one line naming the holder. A lock left by a run that no longer runs on this host
(killed, crashed: its pid is gone) is taken over with a warning; one held from another host is
never taken over, as this host cannot tell whether that run still runs. The lock is released
when the run ends, whatever the reason.
"""

import json
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

import jax

from vnet_jax import hosts
from vnet_jax.errors import TrainingError, UserError, warn
from vnet_jax.files import reporting_write_errors

LOCK_FILE = "run.lock"


def _running_here(holder: dict) -> bool:
  """Whether the holder may still run: any other host, or a live pid of this one."""
  if holder.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, TypeError, ValueError):
    return True  # another user's process, or a lock this version did not write: keep out
  return True


def _describe(holder: dict) -> str:
  return (
    f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')} "
    f"({holder.get('command')})"
  )


class WorkdirLock:
  """`with WorkdirLock(workdir):` the run's body; TrainingError when another run holds it."""

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir) / LOCK_FILE
    self.held = False

  def _try_link(self, text: str) -> bool:
    with reporting_write_errors(self.path):
      self.path.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=f".{LOCK_FILE}.", dir=self.path.parent)
      try:
        with os.fdopen(fd, "w") as f:
          f.write(text)
        os.link(tmp, self.path)
        return True
      except FileExistsError:
        return False
      finally:
        os.unlink(tmp)

  def _acquire(self) -> None:
    me = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
      "command": shlex.join(sys.orig_argv),
    }
    while not self._try_link(json.dumps(me, indent=2) + "\n"):
      try:
        holder = json.loads(self.path.read_text())
      except FileNotFoundError:
        continue  # released meanwhile
      except (OSError, ValueError) as e:
        raise TrainingError(
          f"{self.path}: unreadable lock ({e}); if no run uses this workdir, delete the file"
        ) from None
      if _running_here(holder):
        raise TrainingError(
          f"{self.path}: the workdir is in use by {_describe(holder)}; wait for it to end, or "
          f"choose another --workdir (if that run is gone, delete the file)"
        )
      warn(f"{self.path}: taking over the lock of a run that no longer runs: {_describe(holder)}")
      self.path.unlink(missing_ok=True)
    self.held = True

  def __enter__(self) -> "WorkdirLock":
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except UserError as e:
        error = e
    if not hosts.from_process_0(error is None):
      raise error or TrainingError(f"{self.path}: process 0 could not take the workdir lock")
    return self

  def release(self) -> None:
    if self.held:
      self.held = False
      self.path.unlink(missing_ok=True)

  def __exit__(self, *exc) -> None:
    self.release()
