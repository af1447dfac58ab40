"""What the processes of a multi-host run (one per host) agree on before acting: a damaged
checkpoint, the workdir lock. A single process skips the collectives."""

import jax
import numpy as np


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on at least one."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def from_process_0(value: int) -> int:
  """Process 0's `value`, on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def wait_for_all(name: str) -> None:
  """Returns once every process has reached the call with this `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
