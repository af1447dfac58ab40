"""VNet shapes, parameter count, options and the bfloat16 path; the convolutions against float64
NumPy. Full size only via eval_shape; what runs is a two-level VNet with NumPy-drawn weights,
which compiles in a fraction of the time of random initialisers and a five-level network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vnet_jax import runtime
from vnet_jax.model import VNet, depth_split_conv

TINY = (2, 4)  # filters: one downsampling and one upsampling, every kind of layer


@pytest.fixture(autouse=True, scope="module")
def _quick_compiles():
  # These tests check numbers, not speed: XLA's optimisation passes are most of their time.
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


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


def _variables(model, x, seed=0):
  """Variables of the model's structure drawn in NumPy: lecun-normal kernels, and biases, BN
  scales and running statistics away from their initial 0 / 1, so that each one matters."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    if "scale" in name or "var" in name:
      return rng.uniform(0.5, 1.5, s.shape)
    return rng.normal(scale=0.1, size=s.shape)

  return jax.tree_util.tree_map_with_path(lambda p, s: np.asarray(draw(p, s), s.dtype), shapes)


def _input(shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_default_full_size_shapes_and_parameter_count():
  model = VNet(num_classes=4)
  x = jnp.zeros((2, 128, 128, 128, 1))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out.shape == (2, 128, 128, 128, 4) and out.dtype == jnp.float32
  # BatchNorm scale+bias are params; mean+var are batch_stats (both counted in _block).
  total = _count(variables["params"]) + _count(variables["batch_stats"])
  assert total == expected_params(1, 4, (16, 32, 64, 128, 128))


def test_anisotropic_sizes_divisible_by_16():
  model = VNet(num_classes=14, in_channels=2)
  x = jnp.zeros((1, 32, 80, 48, 2))
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
  assert out.shape == (1, 32, 80, 48, 14)


def test_rejects_bad_input_and_options():
  model = VNet(num_classes=2, filters=(2, 2, 2, 2, 2))
  init = lambda model, shape: jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  with pytest.raises(ValueError, match="divisible by 16"):
    init(model, (1, 24, 16, 16, 1))
  with pytest.raises(ValueError, match="input"):
    init(model, (1, 16, 16, 16, 3))
  with pytest.raises(ValueError, match="downsample"):
    init(VNet(num_classes=2, filters=TINY, downsample="avg"), (1, 4, 4, 4, 1))
  with pytest.raises(ValueError, match="kernel_size"):
    init(VNet(num_classes=2, filters=TINY, kernel_size=4), (1, 4, 4, 4, 1))
  with pytest.raises(ValueError, match="conv_impl"):
    init(VNet(num_classes=2, filters=TINY, conv_impl="fft"), (1, 4, 4, 4, 1))


@pytest.mark.parametrize(
  "downsample,bn,k", [("conv", True, 3), ("maxpool", False, 3), ("conv", False, 5)]
)
def test_options_change_the_parameters_not_the_output_shape(downsample, bn, k):
  filters = (2, 4, 4, 8, 8)
  model = VNet(num_classes=3, filters=filters, downsample=downsample, batch_norm=bn, kernel_size=k)
  x = jnp.zeros((1, 16, 16, 16, 1))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert _count(variables) == expected_params(1, 3, filters, downsample, k, bn)
  assert ("batch_stats" in variables) == bn
  out, updates = jax.eval_shape(
    lambda v: model.apply(
      v, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
    ),
    variables,
  )
  assert out.shape == (1, 16, 16, 16, 3) and out.dtype == jnp.float32
  assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(
    {"batch_stats": variables["batch_stats"]} if bn else {}
  )


@pytest.fixture(scope="module")
def tiny_bn_run():
  """One train-mode and two eval-mode runs of a BatchNorm VNet (maxpool: both downsamplings
  run), compiled once for the tests below."""
  model = VNet(num_classes=3, filters=TINY, downsample="maxpool", dropout_rate=0.0)
  x = _input((2, 4, 8, 8, 1))
  v = _variables(model, x)
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  evaluate = jax.jit(lambda v, x: model.apply(v, x))
  out, updates = train(v, x)
  moved = {**v, **updates}
  return v, updates, out, evaluate(v, x), evaluate(moved, x), train(moved, x)[0]


def test_batch_norm_trains_on_batch_statistics_and_evaluates_on_running_ones(tiny_bn_run):
  v, updates, train_out, eval_out, eval_moved, train_moved = tiny_bn_run
  old, new = v["batch_stats"], updates["batch_stats"]
  assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
  for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
    assert not np.allclose(a, b)  # every running statistic moves in training
  assert np.all(np.isfinite(train_out)) and train_out.shape == (2, 4, 8, 8, 3)
  # Training normalises with the batch's statistics: the running ones do not matter there...
  np.testing.assert_allclose(train_moved, train_out, rtol=1e-5, atol=1e-5)
  # ...evaluation uses the running ones.
  assert not np.allclose(eval_moved, eval_out, atol=1e-3)
  assert not np.allclose(eval_out, train_out, atol=1e-3)


def test_dropout_only_in_training():
  model = VNet(num_classes=2, filters=TINY, dropout_rate=0.5, batch_norm=False)
  x = _input((1, 4, 8, 8, 1))
  v = _variables(model, x)
  train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key}))
  t1, t2 = train(v, x, jax.random.key(1)), train(v, x, jax.random.key(2))
  assert not np.allclose(t1, t2)
  # Evaluation needs no dropout key (Flax raises if a dropout layer would draw one) and gives
  # the network without dropout.
  evaluated = jax.jit(model.apply)(v, x)
  np.testing.assert_array_equal(evaluated, jax.jit(model.clone(dropout_rate=0.0).apply)(v, x))
  assert not np.allclose(t1, evaluated)


def _equations(jaxpr):
  """Every equation of a jaxpr, those of the jaxprs inside it (jit, custom_vjp, scan) too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
        if hasattr(sub, "eqns"):
          yield from _equations(sub)


def test_bfloat16_compute_close_to_float32():
  x = _input((1, 4, 8, 8, 1))
  f32 = VNet(num_classes=3, filters=(4, 8))
  bf16 = f32.clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: bf16.init(jax.random.key(0), x))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))
  v = _variables(f32, x)
  products = [
    eqn
    for eqn in _equations(jax.make_jaxpr(bf16.apply)(v, x).jaxpr)
    if eqn.primitive.name in ("conv_general_dilated", "dot_general")
  ]
  assert len(products) >= 10  # every convolution, Down2's and Up2's products, in bfloat16
  assert all(var.aval.dtype == jnp.bfloat16 for eqn in products for var in eqn.invars)
  a, b = jax.jit(f32.apply)(v, x), jax.jit(bf16.apply)(v, x)
  assert b.dtype == jnp.float32 and np.all(np.isfinite(b))
  np.testing.assert_allclose(b, a, atol=0.05 * float(np.abs(a).max()))


def _f64(x):
  return np.asarray(x, np.float64)


def _numpy_conv3d(x, w):
  """float64 'SAME' 3D convolution (odd kernel): the sum over kernel offsets of shifted,
  zero-padded inputs."""
  k, (d, h, wd) = w.shape[0], x.shape[1:4]
  p = k // 2
  xp = np.pad(_f64(x), ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
  return sum(
    np.einsum("ndhwc,co->ndhwo", xp[:, a : a + d, b : b + h, c : c + wd], _f64(w)[a, b, c])
    for a in range(k)
    for b in range(k)
    for c in range(k)
  )


# Both formulations: taps in the input channels (cin < cout) and in the output channels.
@pytest.mark.parametrize("k,cin,cout", [(3, 1, 4), (3, 5, 3), (5, 2, 2), (5, 2, 3)])
def test_depth_split_conv_equals_float64_numpy(k, cin, cout):
  rng = np.random.default_rng(k * cin)
  x = rng.normal(size=(2, 6, 7, 5, cin)).astype(np.float32)
  w = rng.normal(size=(k, k, k, cin, cout)).astype(np.float32)
  expected = _numpy_conv3d(x, w)
  np.testing.assert_allclose(depth_split_conv(x, w), expected, rtol=1e-4, atol=1e-4)
  native = lax.conv_general_dilated(
    x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
  )
  np.testing.assert_allclose(native, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cin,cout", [(2, 4), (4, 3)])  # taps in input / output channels
def test_depth_split_conv_gradients_equal_lax_conv_under_the_compiler_options(cin, cout):
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


@pytest.mark.parametrize("slicewise", [True, False])
def test_depth_split_conv_kernel_gradient_equals_float64_numpy(slicewise):
  # 32x32 slices with more input than output channels: the kernel gradient is summed slice by
  # slice, in a loop, unless slicewise_kernel_grad=False asks for XLA's own (no loop).
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 3, 32, 32, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 3, 2)).astype(np.float32)
  r = rng.normal(size=(2, 3, 32, 32, 2)).astype(np.float32)
  grad = jax.grad(lambda x, w: jnp.sum(depth_split_conv(x, w, slicewise) * r), argnums=(0, 1))
  assert ("scan" in str(jax.make_jaxpr(grad)(x, w))) == slicewise
  dx, dw = jax.jit(grad, compiler_options=runtime.compiler_options())(x, w)
  # d/dw of sum(conv * r): each kernel offset's shifted input against r; d/dx: r through the
  # transposed kernel, added back at every offset of the zero-padded input.
  xp = np.pad(_f64(x), ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  shifted = lambda a, b, c: (slice(None), slice(a, a + 3), slice(b, b + 32), slice(c, c + 32))
  expected_dw = np.zeros(w.shape)
  expected_dxp = np.zeros(xp.shape)
  for a in range(3):
    for b in range(3):
      for c in range(3):
        expected_dw[a, b, c] = np.einsum("ndhwc,ndhwo->co", xp[shifted(a, b, c)], _f64(r))
        expected_dxp[shifted(a, b, c)] += np.einsum("ndhwo,co->ndhwc", _f64(r), _f64(w)[a, b, c])
  np.testing.assert_allclose(dw, expected_dw, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(dx, expected_dxp[:, 1:-1, 1:-1, 1:-1], rtol=1e-5, atol=1e-4)


def test_slicewise_kernel_gradients_can_be_switched_off_for_the_whole_network():
  # 32x32 slices on the first level: its convolutions use the slice-wise kernel gradient, whose
  # loop XLA's cost analysis would count once. The numbers are the same either way (above).
  x = _input((1, 2, 32, 32, 1))
  model = VNet(num_classes=3, filters=TINY, conv_impl="depth_split", dropout_rate=0.0)
  v = _variables(model, x)
  grad = lambda m: jax.grad(lambda v: jnp.sum(m.apply(v, x, train=True, mutable=True)[0]))
  assert "scan" in str(jax.make_jaxpr(grad(model))(v))
  assert "scan" not in str(jax.make_jaxpr(grad(model.clone(slicewise_kernel_grad=False)))(v))


def test_down2_and_up2_equal_lax_strided_and_transposed_convs():
  from vnet_jax.model import Down2, Up2

  x = _input((2, 4, 6, 8, 3))
  down = Down2(5)
  v = _variables(down, x)
  ref = (
    lax.conv_general_dilated(
      x, v["params"]["kernel"], (2, 2, 2), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    + v["params"]["bias"]
  )
  np.testing.assert_allclose(down.apply(v, x), ref, rtol=1e-5, atol=1e-5)
  up = Up2(4)
  v = _variables(up, x)
  ref = (
    lax.conv_transpose(
      x, v["params"]["kernel"], (2, 2, 2), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    + v["params"]["bias"]
  )
  np.testing.assert_allclose(up.apply(v, x), ref, rtol=1e-5, atol=1e-5)


def test_conv_impls_give_the_same_network_output():
  x = _input((1, 4, 8, 8, 1))
  native = VNet(num_classes=3, filters=TINY, conv_impl="native")
  split = native.clone(conv_impl="depth_split")
  v = _variables(native, x)
  np.testing.assert_allclose(
    jax.jit(split.apply)(v, x), jax.jit(native.apply)(v, x), rtol=1e-4, atol=1e-5
  )
