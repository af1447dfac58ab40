"""XLA compiler options the package's compiled steps use, and a `pmap` that applies them.

On XLA:CPU, enabling YNNPACK fusions makes XLA run the 2D convolutions of the depth-split
formulation (model.py) through YNNPACK instead of Eigen: 2.3x faster for a 3x3 convolution's
forward and backward, 1.3x for the whole train step (docs/performance.md). The option is
experimental in XLA, so it is used only where the installed jaxlib accepts it, and not where
XLA_FLAGS already sets it (the user's choice wins).
`jax.pmap` takes no compiler options, hence the wrapper.
"""

import functools
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE"}


@functools.cache
def compiler_options(backend: str | None = None) -> dict[str, str]:
  """Options for the default (or given) backend; empty where none apply or jaxlib refuses them."""
  backend = backend or jax.default_backend()
  if backend != "cpu" or "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
    return {}
  try:
    x = jax.device_put(jnp.zeros(2), jax.devices(backend)[0])
    jax.jit(jnp.sin).lower(x).compile(compiler_options=_CPU_OPTIONS)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("XLA:CPU YNNPACK fusions unavailable in this jaxlib (%s); compiling without them",
                    " ".join(str(e).split())[:200])
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
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", type(x))) for x in leaves))
    if key not in self._executables:
      self._executables[key] = self._pmapped.lower(*args).compile(compiler_options=self._options)
    return self._executables[key]

  def __call__(self, *args):
    return self.compile(*args)(*args)


def pmap(fn: Callable, **pmap_kwargs) -> Pmapped:
  """`jax.pmap(fn, **pmap_kwargs)` compiled with the devices' backend's compiler options."""
  devices = pmap_kwargs.get("devices")
  return Pmapped(fn, compiler_options(devices[0].platform if devices else None), **pmap_kwargs)
