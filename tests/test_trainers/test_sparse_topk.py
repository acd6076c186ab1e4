import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from multidevice import run_with_cpu_devices
from trainers.ops import sparse_topk_magnitude, sparse_topk_mask
from trainers.pruning import kept_count, prune_array, prune_params, sparsity_of

SOLVERS = ("pav", "dykstra")


def threshold_reference(x, k, l, p=2.0):
  """Independent solution in float64: y = clip(g(x / l - tau), 0, 1) with g(u) = sign(u)|u|^(1/(p-1)), tau
  found by bisection so that sum(y) = k. For p = 2 this is the Euclidean projection onto the capped simplex."""
  z = np.asarray(x, np.float64) / l
  g = lambda u: np.sign(u) * np.abs(u) ** (1.0 / (p - 1.0))
  lo, hi = z.min() - 2.0, z.max() + 1.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if np.clip(g(z - mid), 0, 1).sum() > k else (lo, mid)
  return np.clip(g(z - 0.5 * (lo + hi)), 0.0, 1.0)


def reference_rows(x, k, l, p=2.0):
  x = np.asarray(x)
  return np.stack([threshold_reference(row, k, l, p) for row in x.reshape(-1, x.shape[-1])]).reshape(x.shape)


def hard_topk_mask(x, k):
  _, index = jax.lax.top_k(x, k)
  return np.asarray(jnp.sum(jax.nn.one_hot(index, x.shape[-1]), axis=-2))


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS)
def test_p2_mask_is_the_euclidean_projection_onto_the_capped_simplex(solver):
  rng = np.random.default_rng(0)
  for n, k, l in [(7, 1, 0.5), (64, 2, 0.1), (64, 5, 1.0), (300, 17, 0.3)]:
    x = rng.normal(size=(4, n)).astype(np.float32)
    y = np.asarray(sparse_topk_mask(x, k, l=l, solver=solver))
    np.testing.assert_allclose(y, reference_rows(x, k, l), atol=2e-5)
    # Projection optimality (variational inequality): <z - y, c - y> <= 0 for feasible points c.
    for row, z in zip(y, x / l):
      for _ in range(20):
        c = threshold_reference(rng.normal(size=n) * 3, k, 1.0)   # a random point of the capped simplex
        assert np.dot(z - row, c - row) <= 1e-3 * (1 + np.abs(z).max())


@pytest.mark.slow
@pytest.mark.parametrize("p", [4.0 / 3.0, 3.0, 1.5])
@pytest.mark.parametrize("solver", SOLVERS)
def test_other_p_match_the_threshold_form_and_differ_from_p2(p, solver):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 40)).astype(np.float32)
  y = np.asarray(sparse_topk_mask(x, 4, l=0.5, p=p, solver=solver))
  np.testing.assert_allclose(y, reference_rows(x, 4, 0.5, p), atol=2e-5)
  np.testing.assert_allclose(y.sum(-1), 4.0, atol=1e-4)
  assert (y >= 0).all() and (y <= 1).all() and (y == 0).sum() > 0
  y2 = np.asarray(sparse_topk_mask(x, 4, l=0.5, p=2.0, solver=solver))
  assert np.abs(y - y2).max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0])
def test_mask_sums_to_k_lies_in_unit_box_and_has_exact_zeros(solver, p):
  x = jax.random.normal(jax.random.key(0), (32, 64))
  y = np.asarray(sparse_topk_mask(x, 3, l=0.2, p=p, solver=solver))
  np.testing.assert_allclose(y.sum(-1), 3.0, atol=1e-4)
  assert y.min() == 0.0 and y.max() <= 1.0
  support = (y > 0).sum(-1)
  assert (support >= 3).all() and (support <= 20).all()   # sparse: most entries exactly zero
  assert (y == 1.0).any()                                   # and clear winners exactly one


@pytest.mark.slow
def test_pav_and_dykstra_agree_on_router_shapes_and_long_vectors():
  rng = np.random.default_rng(2)
  for shape, k, l in [((256, 64), 2, 0.1), ((256, 64), 8, 1.0), ((1, 1000), 20, 0.2)]:
    x = rng.normal(size=shape).astype(np.float32)
    for p in (2.0, 4.0 / 3.0):
      pav = np.asarray(sparse_topk_mask(x, k, l=l, p=p, solver="pav"))
      dyk = np.asarray(sparse_topk_mask(x, k, l=l, p=p, solver="dykstra"))
      np.testing.assert_allclose(pav, dyk, atol=1e-4)
      assert ((pav == 0) == (dyk == 0)).mean() > 0.999


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0, 3.0])
def test_gradients_match_finite_differences(solver, p):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(3), (2, 10), dtype=jnp.float64)
    opts = dict(l=0.7, p=p, solver=solver, dykstra_tol=1e-13)
    mask = lambda x: sparse_topk_mask(x, 3, **opts)
    assert 0 < float((mask(x) > 0).sum()) < 20   # a pooled block, so the Jacobian is not trivially zero
    check_grads(mask, (x,), order=1, modes=["fwd", "rev"], eps=1e-6, atol=1e-5, rtol=1e-5)
    check_grads(lambda x: sparse_topk_magnitude(x, 3, **opts), (x,), order=1, modes=["fwd", "rev"],
                eps=1e-6, atol=1e-5, rtol=1e-5)


def test_p2_jacobian_is_block_centring_on_the_support():
  with jax.enable_x64(True):
    x = jnp.array([2.0, 1.9, 1.5, -1.0, 0.3, 1.7], jnp.float64)
    y = sparse_topk_mask(x, 2, l=1.0)
    jac = np.asarray(jax.jacrev(lambda x: sparse_topk_mask(x, 2, l=1.0))(x))
    block = (np.asarray(y) > 0) & (np.asarray(y) < 1)
    expected = np.zeros((6, 6))
    expected[np.ix_(block, block)] = np.eye(block.sum()) - 1.0 / block.sum()
    np.testing.assert_allclose(jac, expected, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.jacfwd(lambda x: sparse_topk_mask(x, 2, l=1.0))(x)), expected,
                               atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_equals_per_row(solver):
  x = jax.random.normal(jax.random.key(4), (2, 3, 16))
  batched = np.asarray(sparse_topk_mask(x, 4, l=0.3, solver=solver))
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(batched[i, j], np.asarray(sparse_topk_mask(x[i, j], 4, l=0.3, solver=solver)),
                                 atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0, 3.0])
def test_vmapped_pav_rows_used_off_cpu_agree_with_sequential_rows(monkeypatch, p):
  from trainers.ops import sparse_topk as ops
  s = -jnp.sort(-jax.random.normal(jax.random.key(12), (5, 33)) / 0.2, axis=-1)
  sequential = np.asarray(ops._pav_mask_sorted(s, 3, p))
  grad_sequential = np.asarray(jax.grad(lambda s: jnp.sum(ops._pav_mask_sorted(s, 3, p) * s))(s))
  monkeypatch.setattr(ops, "_rows_in_sequence", lambda: False)
  np.testing.assert_allclose(np.asarray(ops._pav_mask_sorted(s, 3, p)), sequential, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(lambda s: jnp.sum(ops._pav_mask_sorted(s, 3, p) * s))(s)),
                             grad_sequential, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS)
def test_jit_vmap_and_grad(solver):
  x = jax.random.normal(jax.random.key(5), (6, 12))
  f = lambda x: sparse_topk_mask(x, 3, l=0.5, solver=solver)
  eager = np.asarray(f(x))
  np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), eager, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.vmap(f)(x)), eager, atol=1e-6)
  r = jax.random.normal(jax.random.key(6), (6, 12))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(f(x) * r)))(x)
  per_row = jax.vmap(jax.grad(lambda row, rr: jnp.sum(f(row) * rr)))(x, r)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(per_row), atol=1e-5)
  assert np.abs(np.asarray(grad)).max() > 0
  # Zero gradient outside the support and on clear winners; gradients sum to zero per row (sum is k).
  y = np.asarray(f(x))
  np.testing.assert_allclose(np.asarray(grad)[(y == 0) | (y == 1)], 0.0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grad).sum(-1), 0.0, atol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_small_l_gives_hard_topk_and_large_l_gives_uniform(solver):
  x = jax.random.normal(jax.random.key(7), (16, 50))
  np.testing.assert_array_equal(np.asarray(sparse_topk_mask(x, 5, l=1e-4, solver=solver)), hard_topk_mask(x, 5))
  np.testing.assert_allclose(np.asarray(sparse_topk_mask(x, 5, l=1e4, solver=solver)), 0.1, atol=1e-3)
  # Distances to the hard mask shrink as l does.
  dists = [np.abs(np.asarray(sparse_topk_mask(x, 5, l=l, solver=solver)) - hard_topk_mask(x, 5)).sum()
           for l in (1.0, 0.3, 0.1, 0.03)]
  assert all(a > b for a, b in zip(dists, dists[1:]))


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS)
def test_gradient_in_l_edge_sizes_and_nan(solver):
  x = jnp.array([1.0, 0.9, 0.5, -1.0])
  f = lambda l: jnp.sum(sparse_topk_mask(x, 2, l=l, solver=solver) * jnp.arange(1.0, 5.0))
  assert float(jax.grad(f)(0.5)) == pytest.approx(float(f(0.501) - f(0.499)) / 0.002, rel=1e-2)
  assert float(jax.grad(f)(0.5)) != 0.0
  np.testing.assert_array_equal(np.asarray(sparse_topk_mask(jnp.array([3.0]), 1, solver=solver)), [1.0])
  assert sparse_topk_mask(jnp.zeros((0, 8)), 2, solver=solver).shape == (0, 8)
  y = np.asarray(sparse_topk_mask(jnp.array([[1.0, jnp.nan, 0.0], [1.0, 2.0, 0.0]]), 1, solver=solver))
  assert np.isnan(y[0]).all() and y[1].tolist() == [0.0, 1.0, 0.0]


def test_ties_get_equal_mask_values():
  y = np.asarray(sparse_topk_mask(jnp.array([3.0, 1.0, 3.0, 0.0]), 1, l=0.01))
  np.testing.assert_array_equal(y, [0.5, 0.0, 0.5, 0.0])


@pytest.mark.parametrize("solver", SOLVERS)
def test_magnitude_keeps_signs_and_selects_by_absolute_value(solver):
  x = jnp.array([[0.5, -3.0, 0.1, 2.0, -0.2, 1.0]])
  hard = np.asarray(sparse_topk_magnitude(x, 2, l=1e-3, solver=solver))
  np.testing.assert_array_equal(hard, [[0.0, -3.0, 0.0, 2.0, 0.0, 0.0]])
  soft = np.asarray(sparse_topk_magnitude(x, 2, l=1.0, solver=solver))
  np.testing.assert_allclose(soft, np.asarray(x * sparse_topk_mask(x ** 2 / 2, 2, l=1.0)), atol=1e-6)
  assert soft[0, 1] < 0 and (soft[0, [0, 2, 4]] == 0).all()   # signs kept, small entries exactly zero
  assert np.all(np.abs(soft) <= np.abs(np.asarray(x)) + 1e-7)


@pytest.mark.parametrize("kwargs, name", [
    ({"solver": "sort"}, "solver"), ({"k": 0}, "k"), ({"k": 9}, "k"), ({"k": 2.0}, "k"),
    ({"p": 1.0}, "p"), ({"p": float("inf")}, "p"), ({"l": 0.0}, "l"), ({"l": -1.0}, "l")])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, name):
  args = {"k": 2, **kwargs}
  k = args.pop("k")
  with pytest.raises(ValueError, match=rf"^{name} "):
    sparse_topk_mask(jnp.ones((3, 8)), k, **args)
  with pytest.raises(ValueError, match=rf"^{name} "):
    sparse_topk_magnitude(jnp.ones((3, 8)), k, **args)


def test_dtype_is_kept_and_k_equal_n_is_all_ones():
  x = jax.random.normal(jax.random.key(8), (4, 8)).astype(jnp.bfloat16)
  assert sparse_topk_mask(x, 2).dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(sparse_topk_mask(jnp.arange(5.0), 5)), np.ones(5))


def test_pav_handles_long_vectors_in_seconds():
  x = jax.random.normal(jax.random.key(9), (100_000,))
  f = jax.jit(lambda x: sparse_topk_mask(x, 100, l=0.1))
  f(x).block_until_ready()
  start = time.perf_counter()
  y = np.asarray(f(x))
  assert time.perf_counter() - start < 5.0
  np.testing.assert_allclose(y, threshold_reference(np.asarray(x), 100, 0.1), atol=2e-5)
  assert 100 <= (y > 0).sum() < 1000


@pytest.mark.slow
def test_works_on_a_sharded_mesh():
  """Two host CPU devices in a child process (the device count is fixed when JAX starts)."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from trainers.ops import sparse_topk_mask
      assert jax.device_count() == 2
      mesh = Mesh(np.array(jax.devices()), ("data",))
      x = jax.random.normal(jax.random.key(0), (8, 64))
      xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
      for solver in ("pav", "dykstra"):
        f = jax.jit(lambda x: sparse_topk_mask(x, 2, l=0.1, solver=solver))
        g = jax.jit(jax.grad(lambda x: jnp.sum(sparse_topk_mask(x, 2, l=0.1, solver=solver) * jnp.arange(64.0))))
        y, dy = f(xs), g(xs)
        assert len(y.sharding.device_set) == 2, y.sharding
        np.testing.assert_allclose(np.asarray(y), np.asarray(f(x)), atol=1e-6)
        np.testing.assert_allclose(np.asarray(dy), np.asarray(g(x)), atol=1e-5)
      print("SHARDED-OK")
  """)
  run_with_cpu_devices(code, 2, marker="SHARDED-OK")


# ---------------------------------------------------------------- pruning


def test_hard_pruning_reaches_the_exact_sparsity_and_keeps_the_largest():
  w = jax.random.normal(jax.random.key(10), (32, 16))
  pruned = np.asarray(prune_array(w, 0.75, method="hard"))
  keep = kept_count(w.size, 0.75)
  assert (pruned != 0).sum() == keep == 128
  threshold = np.sort(np.abs(np.asarray(w)).ravel())[-keep]
  np.testing.assert_array_equal(pruned, np.where(np.abs(np.asarray(w)) >= threshold, np.asarray(w), 0.0))


def test_sparse_topk_pruning_matches_hard_for_small_l_and_is_trainable():
  w = jax.random.normal(jax.random.key(11), (32, 16)) * 0.02   # scale-free: l is relative to mean(w^2)/2
  np.testing.assert_array_equal(np.asarray(prune_array(w, 0.9, l=1e-4)),
                                np.asarray(prune_array(w, 0.9, method="hard")))
  soft = np.asarray(prune_array(w, 0.9, l=0.5))
  keep = kept_count(w.size, 0.9)
  assert keep <= (soft != 0).sum() < 2 * keep                  # at most the target sparsity, still sparse
  grad = np.asarray(jax.grad(lambda w: jnp.sum(prune_array(w, 0.9, l=0.5) ** 2))(w))
  assert np.abs(grad[soft != 0]).min() > 0 and (grad[soft == 0] == 0).all()


def test_prune_params_prunes_kernels_only():
  from flax import nnx
  model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 4, rngs=nnx.Rngs(1)))
  model.layers[0].bias[...] = jnp.ones(32)
  state = nnx.state(model, nnx.Param)
  pruned = jax.jit(lambda s: prune_params(s, 0.5, method="hard"))(state)
  nnx.update(model, pruned)
  assert sparsity_of(nnx.state(model, nnx.Param)) == pytest.approx(0.5, abs=1e-3)
  assert (np.asarray(model.layers[0].bias[...]) == 1).all()
  soft = prune_params(nnx.state(model, nnx.Param), 0.8, l=0.05)
  assert 0.6 < sparsity_of(soft) <= 0.8
