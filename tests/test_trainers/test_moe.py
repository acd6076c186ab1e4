import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from multidevice import run_with_cpu_devices
from trainers.moe import MoEFeedForward, expert_capacity, load_balancing_loss
from trainers.ops import sparse_topk_mask

ROUTERS = ("softmax_topk", "sparse_topk")


def _call(model, x, mask=None):
  return nnx.jit(lambda m, x, mask: m(x, mask))(model, x, mask)


@pytest.mark.slow
@pytest.mark.parametrize("router", ROUTERS)
def test_tokens_reach_at_most_k_experts_and_padding_is_never_routed(router):
  model = MoEFeedForward(16, 32, 6, 2, router=router, capacity_factor=2.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 10, 16))
  mask = jnp.arange(10)[None] < jnp.array([[10], [6], [1]])
  out, aux = _call(model, x, mask)
  assignments = np.asarray(aux["assignments"])
  assert ((assignments > 0).sum(-1) <= 2).all()
  assert ((assignments > 0).sum(-1)[np.asarray(mask)] >= 1).all()          # real tokens are processed
  assert (assignments[~np.asarray(mask)] == 0).all()
  assert (np.asarray(out)[~np.asarray(mask)] == 0).all()                   # padding gets a zero update
  assert float(aux["expert_load"].sum()) == (assignments > 0).sum()
  # Padding content changes nothing for real tokens (it uses no capacity and is not routed).
  noisy = jnp.where(mask[..., None], x, 100.0 * jax.random.normal(jax.random.key(2), x.shape))
  out2, aux2 = _call(model, noisy, mask)
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=1e-5)
  np.testing.assert_allclose(np.asarray(aux2["load_balancing_loss"]), np.asarray(aux["load_balancing_loss"]),
                             rtol=1e-5)


def _one_expert_model(router, k, capacity_factor, num_experts=4, width=8):
  """A router that sends every token's first choice to expert 0 (feature 0 is 1 on every token)."""
  model = MoEFeedForward(width, 16, num_experts, k, router=router, capacity_factor=capacity_factor,
                         rngs=nnx.Rngs(0))
  kernel = np.zeros((width, num_experts), np.float32)
  kernel[0, 0] = 10.0
  kernel[1, 1:] = [3.0, 2.0, 1.0][:num_experts - 1]                         # a clear order for second choices
  model.router.kernel[...] = jnp.asarray(kernel)
  x = jax.random.normal(jax.random.key(3), (2, 12, width)).at[..., 0].set(1.0).at[..., 1].set(1.0)
  return model, x


@pytest.mark.slow
@pytest.mark.parametrize("router", ROUTERS)
def test_capacity_is_respected_and_overflowing_tokens_get_no_update(router):
  model, x = _one_expert_model(router, k=1, capacity_factor=1.0)
  out, aux = _call(model, x)
  capacity = expert_capacity(24, 4, 1, 1.0)
  assert int(aux["capacity"]) == capacity == 6
  per_expert = (np.asarray(aux["assignments"]) > 0).reshape(24, 4).sum(0)
  assert per_expert.tolist() == [capacity, 0, 0, 0]
  kept = (np.asarray(aux["assignments"]).reshape(24, 4) > 0).any(-1)
  assert kept[:capacity].all() and not kept[capacity:].any()               # first come, first served
  assert (np.asarray(out).reshape(24, -1)[capacity:] == 0).all()
  assert float(aux["dropped_fraction"]) == pytest.approx(1 - capacity / 24)


def test_first_choices_take_capacity_before_second_choices():
  model, x = _one_expert_model("softmax_topk", k=2, capacity_factor=0.75)
  _, aux = _call(model, x)
  capacity = int(aux["capacity"])                                           # ceil(0.75 * 2 * 24 / 4) = 9
  assignments = (np.asarray(aux["assignments"]) > 0).reshape(24, 4)
  assert capacity == 9 and assignments.sum(0).tolist() == [9, 9, 0, 0]
  # Expert 0 holds only first choices; expert 1 (everyone's second choice) fills in token order.
  assert assignments[:9, 0].all() and assignments[:9, 1].all() and not assignments[9:].any()


def test_load_balancing_loss_equals_its_formula_on_a_hand_made_case():
  model = MoEFeedForward(4, 8, 4, 1, rngs=nnx.Rngs(0))
  model.router.kernel[...] = 3.0 * jnp.eye(4)
  tokens = [0, 0, 1, 2, 3]                                                  # the last one is padding
  x = jax.nn.one_hot(jnp.array([tokens]), 4)
  mask = jnp.array([[True, True, True, True, False]])
  _, aux = _call(model, x, mask)
  logits = 3.0 * np.eye(4)[[0, 0, 1, 2]]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  fraction = np.array([2, 1, 1, 0]) / 4.0
  expected = 4 * np.sum(fraction * probs.mean(0))
  assert float(aux["load_balancing_loss"]) == pytest.approx(expected, rel=1e-5)
  assert np.asarray(aux["expert_load"]).tolist() == [2, 1, 1, 0]
  # Bounds of the formula: 1 for uniform routing, E when one expert takes everything with certainty.
  uniform = load_balancing_loss(jnp.full((8, 4), 0.25), jax.nn.one_hot(jnp.arange(8) % 4, 4), jnp.ones(8))
  collapsed = load_balancing_loss(jax.nn.one_hot(jnp.zeros(8, int), 4), jax.nn.one_hot(jnp.zeros(8, int), 4),
                                  jnp.ones(8))
  assert float(uniform) == pytest.approx(1.0) and float(collapsed) == pytest.approx(4.0)


def test_sparse_router_gates_are_the_sparse_topk_mask_of_the_logits():
  model = MoEFeedForward(8, 16, 5, 2, router="sparse_topk", sparse_l=0.5, capacity_factor=5.0,
                         rngs=nnx.Rngs(4))
  model.router.kernel[...] = jax.random.normal(jax.random.key(5), (8, 5))
  x = jax.random.normal(jax.random.key(6), (1, 20, 8))
  _, aux = _call(model, x)
  mask = np.asarray(sparse_topk_mask(x[0] @ model.router.kernel[...], 2, l=0.5))
  top2 = np.argsort(-mask, axis=-1)[:, :2]
  expected = np.zeros_like(mask)
  np.put_along_axis(expected, top2, np.take_along_axis(mask, top2, -1), -1)
  np.testing.assert_allclose(np.asarray(aux["assignments"][0]), expected, atol=1e-6)
  assert (expected == 1).any() and ((expected > 0) & (expected < 1)).any()  # clear and contested tokens


@pytest.mark.slow
@pytest.mark.parametrize("router", ROUTERS)
def test_both_routers_train_on_a_toy_regression(router):
  """Targets are one of 4 fixed linear maps chosen by the sign pattern of two input features: learnable
  by routing each pattern to its own expert."""
  width = 8
  model = MoEFeedForward(width, 32, 4, 1, router=router, capacity_factor=2.0, rngs=nnx.Rngs(7))
  router_before = np.asarray(model.router.kernel[...]).copy()
  maps = jax.random.normal(jax.random.key(8), (4, width, width)) / np.sqrt(width)
  x = jax.random.normal(jax.random.key(9), (8, 16, width))
  cluster = (x[..., 0] > 0).astype(int) * 2 + (x[..., 1] > 0).astype(int)
  target = jnp.einsum("bld,blde->ble", x, maps[cluster])
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      out, aux = model(x)
      return jnp.mean((out - target) ** 2) + 0.01 * aux["load_balancing_loss"]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(40)]
  assert losses[-1] < 0.5 * losses[0], losses[::8]
  assert np.abs(np.asarray(model.router.kernel[...]) - router_before).max() > 1e-3


def test_experts_are_stacked_and_annotated_for_the_model_axis():
  model = MoEFeedForward(16, 32, 4, 2, rngs=nnx.Rngs(0))
  assert model.w_in[...].shape == (4, 16, 32) and model.w_out[...].shape == (4, 32, 16)
  specs = nnx.get_partition_spec(nnx.state(model))
  assert tuple(specs["w_in"].get_value()) == ("model", None, None)
  assert tuple(specs["b_out"].get_value()) == ("model", None)


@pytest.mark.slow
def test_experts_shard_over_the_model_axis_of_an_active_mesh():
  code = textwrap.dedent("""
      import jax, numpy as np
      from jax.sharding import AxisType
      from flax import nnx
      from trainers.moe import MoEFeedForward
      x = jax.random.normal(jax.random.key(1), (2, 8, 16))
      for router in ("softmax_topk", "sparse_topk"):
        reference, _ = MoEFeedForward(16, 32, 4, 2, router=router, rngs=nnx.Rngs(0))(x)
        mesh = jax.make_mesh((1, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
        with jax.set_mesh(mesh):
          model = MoEFeedForward(16, 32, 4, 2, router=router, rngs=nnx.Rngs(0))
          assert model.w_in[...].sharding.spec == jax.P("model", None, None), model.w_in[...].sharding
          assert len(model.w_in[...].sharding.device_set) == 2
          out, _ = nnx.jit(lambda m, x: m(x))(model, x)
        np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=1e-5)
      print("SHARDED-OK")
  """)
  run_with_cpu_devices(code, 2, marker="SHARDED-OK")


@pytest.mark.parametrize("kwargs, match", [
    ({"router": "hash"}, "model.moe.router"), ({"k": 5}, "model.moe.k"), ({"k": 0}, "model.moe.k"),
    ({"capacity_factor": 0.0}, "model.moe.capacity_factor")])
def test_bad_configuration_raises(kwargs, match):
  args = {"k": 2, **kwargs}
  k = args.pop("k")
  with pytest.raises(ValueError, match=match):
    MoEFeedForward(8, 16, 4, k, rngs=nnx.Rngs(0), **args)
