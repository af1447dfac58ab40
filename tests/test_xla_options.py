"""Compiler options: applied where jaxlib takes them, same numbers, one compile per signature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnet_jax import xla_options
from vnet_jax.model import depth_split_conv


def test_cpu_options_are_used_exactly_when_jaxlib_accepts_them():
  options = xla_options.compiler_options("cpu")
  x = jnp.zeros(2)
  if options:
    assert options == xla_options._CPU_OPTIONS
    jax.jit(jnp.sin).lower(x).compile(compiler_options=options)
  else:
    with pytest.raises(Exception):
      jax.jit(jnp.sin).lower(x).compile(compiler_options=xla_options._CPU_OPTIONS)


def test_no_options_off_cpu():
  assert xla_options.compiler_options("gpu") == {}
  assert xla_options.compiler_options("tpu") == {}


def _conv_case(depth):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 2, depth, 8, 8, 4)).astype(np.float32)
  k = (0.2 * rng.normal(size=(1, 3, 3, 3, 4, 5))).astype(np.float32)
  return x, k


def test_pmapped_matches_plain_pmap_and_compiles_once_per_signature():
  p = xla_options.pmap(depth_split_conv)
  x, k = _conv_case(6)
  expected = jax.pmap(depth_split_conv)(x, k)
  np.testing.assert_allclose(p(x, k), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(p(x + 1, k), jax.pmap(depth_split_conv)(x + 1, k), rtol=1e-5, atol=1e-5)
  assert len(p._executables) == 1
  x4, _ = _conv_case(4)
  assert p(x4, k).shape == (1, 2, 4, 8, 8, 5)
  assert len(p._executables) == 2
  assert p.compile(x, k) is p.compile(x + 2, k)
