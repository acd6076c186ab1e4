"""Magnitude pruning of weights to a target sparsity, with the sparse top-k-in-magnitude operator (the
pruning use of Sander et al. 2023) or a hard threshold for comparison.

  pruned = prune_params(nnx.state(model, nnx.Param), sparsity=0.9)   # then nnx.update(model, pruned)
  sparsity_of(pruned)                                                 # fraction of exact zeros

"sparse_topk" (default) returns w * mask(w^2 / 2) with the relaxed mask of `trainers.ops`: the weights of
clearly large magnitude are kept unchanged, clearly small ones become exactly zero, and the ones near the
threshold are shrunk smoothly, so it can sit inside a loss and be trained through (gradients reach the kept
and borderline weights). Because the relaxed mask spreads the budget k over the borderline weights, its
support can hold more than k weights: the sparsity reached is at most the target, and equals it as l -> 0.
"hard" keeps exactly the k largest |w| (ties by position) and zeroes the rest; its gradient is the mask.

l is relative here: the operator's regularisation is l * mean(w^2) / 2, so one setting suits weights of any
scale (the scale is held constant for differentiation).
"""

import jax
import jax.numpy as jnp
from jax import lax

from trainers.ops import sparse_topk_magnitude

METHODS = ("sparse_topk", "hard")


def kept_count(size: int, sparsity: float) -> int:
  """Weights kept out of `size` at the target sparsity (at least one)."""
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
  return max(1, size - int(round(sparsity * size)))


def prune_array(w, sparsity: float, *, method: str = "sparse_topk", l: float = 0.1, p: float = 2.0,
                solver: str = "pav"):
  """w pruned as a whole (all its entries compete) to the target sparsity; same shape and dtype."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  w = jnp.asarray(w)
  flat = w.reshape(-1)
  keep = kept_count(flat.size, sparsity)
  if keep == flat.size:
    return w
  if method == "hard":
    _, index = lax.top_k(lax.stop_gradient(jnp.abs(flat)), keep)
    return (flat * jnp.zeros_like(flat).at[index].set(1)).reshape(w.shape)
  compute = flat.astype(jnp.promote_types(flat.dtype, jnp.float32))
  scale = lax.stop_gradient(jnp.mean(jnp.square(compute)) / 2 + jnp.finfo(compute.dtype).tiny)
  pruned = sparse_topk_magnitude(compute, keep, l=l * scale, p=p, solver=solver)
  return pruned.astype(w.dtype).reshape(w.shape)


def _prunable(leaf, min_ndim: int) -> bool:
  return hasattr(leaf, "ndim") and leaf.ndim >= min_ndim and jnp.issubdtype(leaf.dtype, jnp.floating)


def prune_params(params, sparsity: float, *, min_ndim: int = 2, **kwargs):
  """Every floating leaf with ndim >= min_ndim (kernels, embeddings, stacked experts) pruned on its own to
  the target sparsity; biases, norms and other small leaves are left alone. Works on any pytree (a plain
  dict or an nnx.State) and under jit/grad. kwargs go to `prune_array`."""
  return jax.tree.map(lambda a: prune_array(a, sparsity, **kwargs) if _prunable(a, min_ndim) else a, params)


def sparsity_of(params, *, min_ndim: int = 2) -> float:
  """Fraction of exact zeros over the prunable leaves (the leaves `prune_params` touches)."""
  leaves = [a for a in jax.tree.leaves(params) if _prunable(a, min_ndim)]
  total = sum(a.size for a in leaves)
  return float(sum(jnp.sum(a == 0) for a in leaves) / max(total, 1))
