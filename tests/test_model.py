"""VNet shapes, parameter count, options and the bfloat16 path; full size only via eval_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnet_jax.model import VNet


def _conv(cin, cout, k):
  return k**3 * cin * cout + cout


def _block(cin, cout, k=3, bn=True):
  # 2 BNs: scale, bias, mean, var.
  n = _conv(cin, cout, k) + _conv(cout, cout, k) + (2 * 4 * cout if bn else 0)
  return n + (_conv(cin, cout, 1) if cin != cout else 0)


def expected_params(in_ch, num_classes, filters, downsample="conv", k=3, bn=True):
  n = _block(in_ch, filters[0], k, bn)
  for prev, f in zip(filters[:-1], filters[1:]):
    if downsample == "conv":
      n += _conv(prev, f, 2) + _block(f, f, k, bn)
    else:
      n += _block(prev, f, k, bn)
  up_in = filters[-1]
  for f in reversed(filters[:-1]):
    n += _conv(up_in, f, 2) + _block(2 * f, f, k, bn)
    up_in = f
  return n + _conv(filters[0], num_classes, 1)


def _count(tree):
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))


def test_default_full_size_shapes_and_parameter_count():
  model = VNet(num_classes=4)
  x = jax.ShapeDtypeStruct((2, 128, 128, 128, 1), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(x.shape), train=False), variables)
  assert out.shape == (2, 128, 128, 128, 4) and out.dtype == jnp.float32
  # BatchNorm scale+bias are params; mean+var are batch_stats (both counted in _block).
  total = _count(variables["params"]) + _count(variables["batch_stats"])
  assert total == expected_params(1, 4, (16, 32, 64, 128, 128))


def test_anisotropic_sizes_divisible_by_16():
  model = VNet(num_classes=14, in_channels=2)
  x = jnp.zeros((1, 32, 80, 48, 2))
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
  assert out.shape == (1, 32, 80, 48, 14)


def test_rejects_bad_input():
  model = VNet(num_classes=2, filters=(2, 2, 2, 2, 2))
  with pytest.raises(ValueError, match="divisible by 16"):
    model.init(jax.random.key(0), jnp.zeros((1, 24, 16, 16, 1)))
  with pytest.raises(ValueError, match="input"):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 16, 3)))


@pytest.mark.parametrize(
  "downsample,bn,k", [("conv", True, 3), ("maxpool", False, 3), ("conv", False, 5)]
)
def test_tiny_model_runs_with_options(downsample, bn, k):
  filters = (2, 4, 4, 8, 8)
  model = VNet(num_classes=3, filters=filters, downsample=downsample, batch_norm=bn, kernel_size=k)
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert _count(variables) == expected_params(1, 3, filters, downsample, k, bn)
  apply = jax.jit(
    lambda v, x: model.apply(
      v, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"] if bn else []
    )
  )
  out, updates = apply(variables, x)
  assert out.shape == (1, 16, 16, 16, 3) and np.all(np.isfinite(out))
  if bn:  # running statistics move during training
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert any(
      not np.allclose(a, b)
      for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new))
    )


def test_dropout_only_in_training():
  model = VNet(num_classes=2, filters=(2, 2, 2, 2, 2), dropout_rate=0.5, batch_norm=False)
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 1))
  v = model.init(jax.random.key(0), x)
  eval1, eval2 = model.apply(v, x), model.apply(v, x)
  np.testing.assert_array_equal(eval1, eval2)
  t1 = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
  t2 = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(t1, t2)


def test_bfloat16_compute_close_to_float32():
  filters = (4, 4, 8, 8, 8)
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 1))
  f32 = VNet(num_classes=3, filters=filters)
  bf16 = VNet(num_classes=3, filters=filters, dtype=jnp.bfloat16)
  v = f32.init(jax.random.key(0), x)
  assert all(
    leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(bf16.init(jax.random.key(0), x))
  )
  a, b = f32.apply(v, x), bf16.apply(v, x)
  assert b.dtype == jnp.float32 and np.all(np.isfinite(b))
  np.testing.assert_allclose(b, a, atol=0.1 * float(jnp.abs(a).max()) + 1e-3)


def _f64(x):
  return np.asarray(x, np.float64)


@pytest.mark.parametrize("k,cin,cout", [(3, 1, 4), (3, 5, 3), (5, 2, 2), (5, 2, 3)])
def test_depth_split_conv_equals_lax_conv(k, cin, cout):
  from jax import lax

  from vnet_jax.model import depth_split_conv

  rng = np.random.default_rng(k * cin)
  x = rng.normal(size=(2, 6, 7, 5, cin)).astype(np.float32)
  w = rng.normal(size=(k, k, k, cin, cout)).astype(np.float32)
  ref = (
    lax.conv_general_dilated(
      _f64(x), _f64(w), (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    if jax.config.jax_enable_x64
    else None
  )
  native = lax.conv_general_dilated(
    x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
  )
  # float64 NumPy reference: explicit sum over kernel offsets of shifted, zero-padded inputs.
  p = k // 2
  xp = np.pad(_f64(x), ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
  expected = sum(
    np.einsum("ndhwc,co->ndhwo", xp[:, a : a + 6, b : b + 7, c : c + 5], _f64(w)[a, b, c])
    for a in range(k)
    for b in range(k)
    for c in range(k)
  )
  assert ref is None or np.allclose(ref, expected)
  np.testing.assert_allclose(
    depth_split_conv(jnp.asarray(x), jnp.asarray(w)), expected, rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(native, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cin,cout", [(2, 4), (4, 3)])  # taps in input / output channels
def test_depth_split_conv_gradients_equal_lax_conv_under_the_compiler_options(cin, cout):
  from jax import lax

  from vnet_jax import runtime
  from vnet_jax.model import depth_split_conv

  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 6, 8, 5, cin)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, cin, cout)).astype(np.float32)
  r = rng.normal(size=(2, 6, 8, 5, cout)).astype(np.float32)
  native = lambda x, w: lax.conv_general_dilated(
    x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
  )
  grads = lambda conv: jax.jit(
    jax.grad(lambda x, w: jnp.sum(conv(x, w) * r), argnums=(0, 1)),
    compiler_options=runtime.compiler_options(),
  )(x, w)
  for got, expected in zip(grads(depth_split_conv), grads(native)):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_depth_split_conv_slicewise_kernel_gradient_equals_float64_numpy():
  # 32x32 slices with more input than output channels: the kernel gradient is summed slice by slice.
  from vnet_jax import runtime
  from vnet_jax.model import depth_split_conv

  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 3, 32, 32, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 3, 2)).astype(np.float32)
  r = rng.normal(size=(2, 3, 32, 32, 2)).astype(np.float32)
  dx, dw = jax.jit(
    jax.grad(lambda x, w: jnp.sum(depth_split_conv(x, w) * r), argnums=(0, 1)),
    compiler_options=runtime.compiler_options(),
  )(x, w)
  # d/dw of sum(conv * r): each kernel offset's shifted input against r; d/dx: r through the
  # transposed kernel, added back at every offset of the zero-padded input.
  xp = np.pad(_f64(x), ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  shifted = lambda a, b, c: (slice(None), slice(a, a + 3), slice(b, b + 32), slice(c, c + 32))
  offsets = [(a, b, c) for a in range(3) for b in range(3) for c in range(3)]
  expected_dw = np.zeros(w.shape)
  expected_dxp = np.zeros(xp.shape)
  for a, b, c in offsets:
    expected_dw[a, b, c] = np.einsum("ndhwc,ndhwo->co", xp[shifted(a, b, c)], _f64(r))
    expected_dxp[shifted(a, b, c)] += np.einsum("ndhwo,co->ndhwc", _f64(r), _f64(w)[a, b, c])
  np.testing.assert_allclose(dw, expected_dw, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(dx, expected_dxp[:, 1:-1, 1:-1, 1:-1], rtol=1e-5, atol=1e-4)


def test_down2_and_up2_equal_lax_strided_and_transposed_convs():
  from jax import lax

  from vnet_jax.model import Down2, Up2

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4, 6, 8, 3)), jnp.float32)
  down = Down2(5)
  v = down.init(jax.random.key(0), x)
  ref = (
    lax.conv_general_dilated(
      x, v["params"]["kernel"], (2, 2, 2), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    + v["params"]["bias"]
  )
  np.testing.assert_allclose(down.apply(v, x), ref, rtol=1e-5, atol=1e-5)
  up = Up2(4)
  v = up.init(jax.random.key(1), x)
  v = jax.tree_util.tree_map(lambda a: a + 0.1, v)  # non-zero bias too
  ref = (
    lax.conv_transpose(
      x, v["params"]["kernel"], (2, 2, 2), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    + v["params"]["bias"]
  )
  np.testing.assert_allclose(up.apply(v, x), ref, rtol=1e-5, atol=1e-5)


def test_conv_impls_give_the_same_network_output():
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 1))
  native = VNet(num_classes=3, filters=(2, 4, 4, 8, 8), conv_impl="native")
  split = VNet(num_classes=3, filters=(2, 4, 4, 8, 8), conv_impl="depth_split")
  v = native.init(jax.random.key(0), x)
  np.testing.assert_allclose(split.apply(v, x), native.apply(v, x), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="conv_impl"):
    VNet(num_classes=3, conv_impl="fft").init(jax.random.key(0), x)


def test_xla_kernel_gradients_traces_the_same_sums_without_a_loop():
  from vnet_jax.model import depth_split_conv, xla_kernel_gradients

  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(1, 2, 32, 32, 2)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 2)), jnp.float32)
  # A new function each time: JAX caches traces per function.
  grad = lambda: jax.grad(lambda x, w: jnp.sum(depth_split_conv(x, w) ** 2), argnums=(0, 1))
  assert "scan" in str(jax.make_jaxpr(grad())(x, w))
  with xla_kernel_gradients():
    jaxpr, grads = str(jax.make_jaxpr(grad())(x, w)), grad()(x, w)
  assert "scan" not in jaxpr
  assert "scan" in str(jax.make_jaxpr(grad())(x, w))  # restored on exit
  for got, expected in zip(grads, grad()(x, w)):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
