"""How the package runs XLA fast: compiler options, a `pmap` that applies them, huge pages.

On XLA:CPU, enabling YNNPACK fusions makes XLA run the 2D convolutions of the depth-split
formulation (model.py) through YNNPACK instead of Eigen: 2.3x faster for a 3x3 convolution's
forward and backward, 1.3x for the whole train step (docs/performance.md). The option is
experimental in XLA, so it is used only where the installed jaxlib accepts it, and not where
XLA_FLAGS already sets it (the user's choice wins).
`jax.pmap` takes no compiler options, hence the wrapper.

XLA:CPU allocates each execution's scratch memory afresh (about 700 MB for a 64^3 train step) and
glibc maps it page by page: 180k page faults a step, 0.2 s of its 1.3 s. Backed by transparent
huge pages they are 1k. glibc reads that setting only at start, so the command-line entry points
re-execute themselves once with it (`exec_with_huge_pages`, opt out with --nohuge_pages).
"""

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils

# Any YNN fusion type switches the convolutions to YNNPACK. REDUCE, not ELTWISE: as fast for the
# train step, and ELTWISE's fused ReLU turns NaN into 0, hiding a diverged run from the
# non-finite-loss check (tests/test_runtime.py).
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options(backend: str | None = None) -> dict[str, str]:
  """Options for the default (or given) backend; empty where none apply or jaxlib refuses them."""
  backend = backend or jax.default_backend()
  if backend != "cpu" or any(name in os.environ.get("XLA_FLAGS", "") for name in _CPU_OPTIONS):
    return {}
  try:
    x = jax.device_put(jnp.zeros(2), jax.devices(backend)[0])
    jax.jit(jnp.sin).lower(x).compile(compiler_options=_CPU_OPTIONS)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning(
      "XLA:CPU YNNPACK fusions unavailable in this jaxlib (%s); compiling without them",
      " ".join(str(e).split())[:200],
    )
    return {}
  return dict(_CPU_OPTIONS)


class Pmapped:
  """`jax.pmap(fn, **kwargs)` compiled with `compiler_options()`, once per argument signature.

  Call it as the pmap'd function; `compile(*args)` gives the executable for those arguments
  (what a call would run), for cost and memory analysis.
  """

  def __init__(self, fn: Callable, options: dict[str, str], **pmap_kwargs):
    self._pmapped = jax.pmap(fn, **pmap_kwargs)
    self._options = options
    self._executables: dict[Any, Any] = {}

  def compile(self, *args):
    return self._executable(*jax.tree.flatten(args))

  def _executable(self, leaves, treedef):
    key = (
      treedef,
      tuple((getattr(x, "shape", None), getattr(x, "dtype", type(x))) for x in leaves),
    )
    if key not in self._executables:
      args = jax.tree.unflatten(treedef, leaves)
      self._executables[key] = self._pmapped.lower(*args).compile(compiler_options=self._options)
    return self._executables[key]

  def __call__(self, *args):
    leaves, treedef = jax.tree.flatten(args)
    executable = self._executable(leaves, treedef)
    if jax.process_count() == 1:
      return executable(*args)
    # Multi-process: the executable takes and gives global arrays; pmap's callers pass and
    # expect each process's local devices' shares, which jax.pmap converts itself.
    in_shardings = jax.tree.leaves(executable.input_shardings[0])
    global_args = [
      multihost_utils.host_local_array_to_global_array(x, sh.mesh, sh.spec)
      for x, sh in zip(leaves, in_shardings)
    ]
    out = executable(*jax.tree.unflatten(treedef, global_args))
    return jax.tree.map(
      lambda x, sh: multihost_utils.global_array_to_host_local_array(x, sh.mesh, sh.spec),
      out,
      executable.output_shardings,
    )


def pmap(fn: Callable, **pmap_kwargs) -> Pmapped:
  """`jax.pmap(fn, **pmap_kwargs)` compiled with the devices' backend's compiler options."""
  devices = pmap_kwargs.get("devices")
  return Pmapped(fn, compiler_options(devices[0].platform if devices else None), **pmap_kwargs)


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"


# IDE debuggers loaded into this process (pdb and the profilers show as a trace or profile
# function instead; absl imports pdb itself, so its presence means nothing).
_TOOL_MODULES = ("pydevd", "debugpy")


def under_debugger_or_profiler() -> bool:
  return (
    sys.gettrace() is not None
    or sys.getprofile() is not None
    or any(name in sys.modules for name in _TOOL_MODULES)
  )


def exec_with_huge_pages() -> None:
  """On Linux, re-executes this command with glibc's malloc on transparent huge pages.

  Only command-line entry points call it (`cli.run`), never an import. Does nothing where
  GLIBC_TUNABLES already names the tunable (set it to 0 to opt out), off Linux, or under a
  debugger or profiler; older glibc and kernels without transparent huge pages ignore it.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (
    not sys.platform.startswith("linux")
    or HUGE_PAGES_TUNABLE in tunables
    or under_debugger_or_profiler()
  ):
    return
  env = dict(
    os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, f"{HUGE_PAGES_TUNABLE}=1"]))
  )
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
