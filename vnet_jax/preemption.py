"""Preemption and Ctrl-C: SIGTERM or SIGINT stops training after the current step, with a
checkpoint; a second signal exits at once.

Schedulers (SLURM, Kubernetes, spot VMs) send SIGTERM some seconds before they kill a job. The
training loop asks `StopRequest.agreed()` after every step. With several hosts the signal may
reach only some of them, so the processes add up their flags in a tiny collective each step and
read the sum one step later (the check never waits for the devices): all of them stop after the
same step, the one after the signal arrived.

A run stopped this way exits with status 128 + the signal's number, 143 for SIGTERM and 130 for
SIGINT, as if the signal had ended it: schedulers and scripts count it as unfinished and can
requeue it. Its checkpoint is complete; rerunning the same command resumes from it.
"""

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
  """Training stopped on a signal after `step`; the checkpoint of that step is saved."""

  def __init__(self, signum: int, step: int, checkpoint: Path):
    super().__init__(
      f"stopped by {signal.Signals(signum).name} after step {step}, checkpoint saved in "
      f"{checkpoint}"
    )
    self.signum, self.step, self.checkpoint = signum, step, checkpoint

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopRequest:
  """Handles SIGTERM and SIGINT from its creation until `close()` (main thread only; elsewhere
  it never asks to stop; an ignored signal stays ignored). `before_exit` runs before a second
  signal ends the process."""

  def __init__(self, before_exit: Callable[[], None] = lambda: None):
    self.signum: int | None = None
    self._before_exit = before_exit
    self._pending = None  # several hosts: the sum of the flags of the previous step
    self._sum = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      # A signal ignored by whoever started the run (nohup, a background job) stays ignored.
      ignored = [s for s in SIGNALS if signal.getsignal(s) is signal.SIG_IGN]
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS if s not in ignored}

  def _handle(self, signum: int, frame) -> None:
    # os.write: the signal may interrupt a print to stderr, and print is not reentrant.
    name = signal.Signals(signum).name
    if self.signum is None:
      self.signum = signum
      line = f"{name}: saving a checkpoint after this step, then exiting ({name} again: at once)"
      os.write(2, f"{line}\n".encode())
      return
    os.write(2, f"{name} again: exiting now; a rerun resumes from the last checkpoint\n".encode())
    self._before_exit()
    os._exit(128 + signum)

  def agreed(self) -> bool:
    """Whether all processes stop after this step; call it once per step on every process."""
    if jax.process_count() == 1:
      return self.signum is not None
    if self._sum is None:
      self._sum = jax.pmap(lambda flag: jax.lax.psum(flag, "devices"), axis_name="devices")
    flags = np.full(jax.local_device_count(), self.signum is not None, np.int32)
    previous, self._pending = self._pending, self._sum(flags)
    return previous is not None and int(previous[0]) > 0

  def close(self) -> None:
    """Gives the signals back to the handlers they had before."""
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
