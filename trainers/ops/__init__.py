"""Differentiable array operators used by the trainers' models (pure JAX, jit/vmap/grad-safe)."""

from trainers.ops.sparse_topk import sparse_topk_magnitude, sparse_topk_mask

__all__ = ["sparse_topk_mask", "sparse_topk_magnitude"]
