"""Segment-masked dense attention: the one attention function of the trainers' models (the NaViT encoder,
its attention pooling, and the STAR tubelet decoder's self- and cross-attention).

Packing puts several examples in one row; each token carries the segment id of its example (0 = padding), and
a query may only see keys of its own segment.
"""

import jax
import jax.numpy as jnp

_NEG = -1e9  # finite, so rows that see no key at all (padding) stay free of NaN


def segment_mask(query_segments, key_segments):
  """query_segments [B, Q], key_segments [B, K] int -> bool [B, Q, K]: same segment, and the key is not padding."""
  return (query_segments[:, :, None] == key_segments[:, None, :]) & (key_segments[:, None, :] > 0)


def attention(q, k, v, mask):
  """q [B, Q, H, d], k/v [B, K, H, d], mask [B, Q, K] or None -> [B, Q, H, d]; softmax in f32.

  A masked-out key gets exactly zero weight (its logit sits 1e9 below the row's maximum), so what a query
  sees of another segment is nothing, not a small leak.
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[:, None], logits, _NEG)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
