"""Compiler options: applied where jaxlib takes them, same numbers, one compile per signature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnet_jax import runtime
from vnet_jax.model import VNet, depth_split_conv


def test_cpu_options_are_used_exactly_when_jaxlib_accepts_them():
  options = runtime.compiler_options("cpu")
  x = jnp.zeros(2)
  if options:
    assert options == runtime._CPU_OPTIONS
    jax.jit(jnp.sin).lower(x).compile(compiler_options=options)
  else:
    with pytest.raises(Exception):  # noqa: B017 - jaxlib's error type for an unknown option varies
      jax.jit(jnp.sin).lower(x).compile(compiler_options=runtime._CPU_OPTIONS)


def test_no_options_off_cpu():
  assert runtime.compiler_options("gpu") == {}
  assert runtime.compiler_options("tpu") == {}


def test_no_options_where_xla_flags_set_one(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_NONE")
  runtime.compiler_options.cache_clear()
  try:
    assert runtime.compiler_options("cpu") == {}
  finally:
    runtime.compiler_options.cache_clear()


def _conv_case(depth):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 2, depth, 8, 8, 4)).astype(np.float32)
  k = (0.2 * rng.normal(size=(1, 3, 3, 3, 4, 5))).astype(np.float32)
  return x, k


def test_pmapped_matches_plain_pmap_and_compiles_once_per_signature():
  p = runtime.pmap(depth_split_conv)
  x, k = _conv_case(6)
  expected = jax.pmap(depth_split_conv)(x, k)
  np.testing.assert_allclose(p(x, k), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    p(x + 1, k), jax.pmap(depth_split_conv)(x + 1, k), rtol=1e-5, atol=1e-5
  )
  assert len(p._executables) == 1
  x4, _ = _conv_case(4)
  assert p(x4, k).shape == (1, 2, 4, 8, 8, 5)
  assert len(p._executables) == 2
  assert p.compile(x, k) is p.compile(x + 2, k)


def _exec_env(monkeypatch, platform, tunables):
  calls = []
  monkeypatch.setattr(runtime.sys, "platform", platform)
  monkeypatch.setattr(runtime.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
  if tunables is None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  else:
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
  runtime.exec_with_huge_pages()
  return calls


def test_exec_with_huge_pages_reexecutes_the_same_command_once(monkeypatch):
  ((exe, argv, env),) = _exec_env(monkeypatch, "linux", None)
  assert exe == runtime.sys.executable and argv == runtime.sys.orig_argv
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  ((_, _, env),) = _exec_env(monkeypatch, "linux", "glibc.malloc.arena_max=2")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
  "platform,tunables",
  [("linux", "glibc.malloc.hugetlb=0"), ("linux", "glibc.malloc.hugetlb=1"), ("darwin", None)],
)
def test_exec_with_huge_pages_respects_a_set_tunable_and_other_systems(
  monkeypatch, platform, tunables
):
  assert _exec_env(monkeypatch, platform, tunables) == []


@pytest.mark.slow
def test_compiled_model_propagates_nan_like_xla():
  """Overflowing activations must reach the logits as NaN, or a diverged run trains on silently."""
  # 16x16 slices: smaller ones do not go through the YNNPACK fusions that could swallow NaN.
  model = VNet(num_classes=3, filters=(4, 8), conv_impl="depth_split", dropout_rate=0.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 16, 16, 1)).astype(np.float32))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  huge = jax.tree.map(lambda p: p * 1e30 + 1e29, variables["params"])

  def logits(options):
    apply = lambda p: model.apply(
      {"params": p, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
    )[0]
    return np.asarray(jax.jit(apply, compiler_options=options)(huge))

  expected = np.isnan(logits({}))
  assert expected.any()
  np.testing.assert_array_equal(np.isnan(logits(runtime.compiler_options())), expected)
