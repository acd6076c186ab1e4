"""A mixture-of-experts feed-forward layer (Flax NNX) with a softmax top-k or a sparse top-k router.

Drop-in for the MLP of `trainers.model.Block`, same call convention: x [B, L, D] and a token mask [B, L]
(`segment_ids > 0`); it returns (update [B, L, D], aux). The Block adds the update to its residual stream
and the train loop adds `coef * aux["load_balancing_loss"]` (e.g. coef = 0.01) to the task loss:

  self.moe = MoEFeedForward(width, mlp_dim, num_experts, k, router=router, rngs=rngs)
  ...
  update, aux = self.moe(self.norm2(x), segment_ids > 0)
  x = x + update

Routing (per token, over its router logits): "softmax_topk" picks the k largest logits and gates each pick
by its softmax probability (Switch/GShard); "sparse_topk" picks the same k experts but gates them by the
sparse top-k mask of the logits (`trainers.ops.sparse_topk_mask`, Sander et al. 2023), which is 1 for
clear winners, fractional for contested experts and differentiable with respect to which experts win. The
mask's support can exceed k when several experts share the budget; only the k largest are dispatched, so a
token never reaches more than k experts (its other mask entries are dropped).

Capacity: each expert takes at most ceil(capacity_factor * k * B * L / num_experts) tokens per call, first
choices before second choices, then in token order (GShard); a pick over capacity is dropped and the token
gets no update from that expert (the Block's residual carries it through). Padding tokens are never routed,
use no capacity and get a zero update.

Sharding: the experts' weights are stacked [E, ...] Params annotated out_sharding=("model", None, ...), so
`nnx.get_partition_spec(nnx.state(model))` places experts on the mesh's "model" axis. When a mesh with a
"model" axis is active at construction (`jax.set_mesh`), Flax shards them eagerly; otherwise the annotation
is metadata only and the caller shards the state.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from trainers.ops import sparse_topk_mask

ROUTERS = ("softmax_topk", "sparse_topk")


def _expert_param(value, out_sharding):
  mesh = jax.sharding.get_abstract_mesh()
  eager = not mesh.empty and "model" in mesh.axis_names
  return nnx.Param(value, out_sharding=out_sharding, eager_sharding=eager)


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """Tokens one expert may take in a call: the even share of the k * num_tokens picks, times the factor."""
  return max(1, min(num_tokens, math.ceil(capacity_factor * k * num_tokens / num_experts)))


def load_balancing_loss(router_probs, picks, token_mask):
  """num_experts * sum_e fraction_e * mean_prob_e (Switch Transformer's auxiliary loss).

  router_probs [T, E] (softmax of the logits); picks [T, E] 1 where a token was routed to an expert (before
  capacity); token_mask [T]. fraction_e is expert e's share of all picks, mean_prob_e the mean router
  probability of e over real tokens. Uniform routing gives 1; everything on one expert gives E.
  """
  num_experts = router_probs.shape[-1]
  picks = picks * token_mask[:, None]
  fraction = picks.sum(0) / jnp.maximum(picks.sum(), 1.0)
  mean_prob = (router_probs * token_mask[:, None]).sum(0) / jnp.maximum(token_mask.sum(), 1.0)
  return num_experts * jnp.sum(fraction * mean_prob)


class MoEFeedForward(nnx.Module):
  """E expert MLPs (D -> mlp_dim -> D, gelu) behind a top-k router; see the module docstring."""

  def __init__(self, width: int, mlp_dim: int, num_experts: int, k: int, *, router: str = "softmax_topk",
               capacity_factor: float = 1.25, sparse_l: float = 0.1, sparse_p: float = 2.0,
               sparse_solver: str = "pav", rngs: nnx.Rngs):
    if router not in ROUTERS:
      raise ValueError(f"model.moe.router must be one of {ROUTERS}, got {router!r}")
    if not 1 <= k <= num_experts:
      raise ValueError(f"model.moe.k ({k}) must be in [1, model.moe.num_experts ({num_experts})]")
    if not capacity_factor > 0:
      raise ValueError(f"model.moe.capacity_factor must be > 0, got {capacity_factor!r}")
    self.num_experts, self.k, self.router_name = num_experts, k, router
    self.capacity_factor = capacity_factor
    self.sparse_l, self.sparse_p, self.sparse_solver = sparse_l, sparse_p, sparse_solver
    # Small router init: near-uniform probabilities at the start, so early routing is not decided by noise.
    self.router = nnx.Linear(width, num_experts, use_bias=False,
                             kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.w_in = _expert_param(init(rngs.params(), (num_experts, width, mlp_dim)), ("model", None, None))
    self.b_in = _expert_param(jnp.zeros((num_experts, mlp_dim)), ("model", None))
    self.w_out = _expert_param(init(rngs.params(), (num_experts, mlp_dim, width)), ("model", None, None))
    self.b_out = _expert_param(jnp.zeros((num_experts, width)), ("model", None))

  def route(self, logits):
    """Per token: the k experts picked [T, k] and their gates [T, k] (0 means not dispatched)."""
    _, picked = jax.lax.top_k(logits, self.k)
    if self.router_name == "softmax_topk":
      weights = jax.nn.softmax(logits, axis=-1)
    else:
      weights = sparse_topk_mask(logits, self.k, l=self.sparse_l, p=self.sparse_p, solver=self.sparse_solver)
    return picked, jnp.take_along_axis(weights, picked, axis=-1)

  def __call__(self, x, token_mask=None):
    """x [B, L, D], token_mask [B, L] (True for real tokens) -> (update [B, L, D], aux).

    aux: load_balancing_loss (scalar), expert_load [E] (tokens each expert processed), routed [E] (picks
    before capacity), dropped_fraction, capacity, and assignments [B, L, E] (the gate of every pick that
    was processed, 0 elsewhere).
    """
    b, length, d = x.shape
    num_tokens, e, k = b * length, self.num_experts, self.k
    tokens = x.reshape(num_tokens, d)
    real = (jnp.ones((num_tokens,), bool) if token_mask is None
            else jnp.asarray(token_mask).reshape(num_tokens).astype(bool))
    logits = self.router(tokens).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    picked, gates = self.route(logits)
    routed = real[:, None] & (gates > 0)                                       # [T, k]
    capacity = expert_capacity(num_tokens, e, k, self.capacity_factor)
    onehot = jax.nn.one_hot(picked, e, dtype=jnp.int32) * routed[..., None]      # [T, k, E]
    # Queue positions, first choices of all tokens before second choices (slot-major), then token order.
    queue = jnp.cumsum(onehot.transpose(1, 0, 2).reshape(k * num_tokens, e), axis=0) - 1
    position = (queue.reshape(k, num_tokens, e).transpose(1, 0, 2) * onehot).sum(-1)  # [T, k]
    kept = routed & (position < capacity)
    expert_index = jnp.where(kept, picked, e)          # out of range: the scatter drops it, the gather fills 0
    slot_index = jnp.where(kept, position, capacity)
    dispatched = jnp.zeros((e, capacity, d), x.dtype).at[expert_index, slot_index].add(
        jnp.broadcast_to(tokens[:, None, :], (num_tokens, k, d)), mode="drop")
    hidden = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", dispatched, self.w_in[...]) + self.b_in[...][:, None])
    expert_out = jnp.einsum("ecf,efd->ecd", hidden, self.w_out[...]) + self.b_out[...][:, None]
    combined = expert_out.at[expert_index, slot_index].get(mode="fill", fill_value=0)  # [T, k, D]
    weight = jnp.where(kept, gates, 0.0).astype(x.dtype)
    update = jnp.einsum("tk,tkd->td", weight, combined)
    assignments = (jax.nn.one_hot(picked, e, dtype=jnp.float32) * weight[..., None]).sum(1)
    realf = real.astype(jnp.float32)
    picks = onehot.sum(1).astype(jnp.float32)
    aux = {
        "load_balancing_loss": load_balancing_loss(probs, picks, realf),
        "expert_load": (jax.nn.one_hot(picked, e) * kept[..., None]).sum((0, 1)),
        "routed": picks.sum(0),
        "dropped_fraction": 1.0 - kept.sum() / jnp.maximum(routed.sum(), 1),
        "capacity": jnp.asarray(capacity, jnp.int32),
        "assignments": assignments.reshape(b, length, e),
    }
    return update.reshape(b, length, d), aux
