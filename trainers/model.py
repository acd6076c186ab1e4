"""A small NaViT in Flax NNX: packed sequences of patches from several images, attention masked by segment id
so images never see each other, masked mean pooling per image slot, one classification head."""

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
  """Pre-norm transformer block with segment-masked self-attention."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"model.width ({width}) must be divisible by model.heads ({heads})")
    self.heads = heads
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.out = nnx.Linear(width, width, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp_in = nnx.Linear(width, mlp_dim, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, width, rngs=rngs)

  def __call__(self, x, mask):
    b, length, width = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    split = lambda t: t.reshape(b, length, self.heads, width // self.heads)
    logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(width // self.heads)
    # A large finite negative (not -inf) keeps padding rows, which see no key at all, free of NaN.
    logits = jnp.where(mask[:, None], logits, -1e9)
    attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), split(v))
    x = x + self.out(attended.reshape(b, length, width))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))


class NaViT(nnx.Module):

  def __init__(self, *, patch_dim: int, num_classes: int, max_images: int, max_grid: int, width: int,
               depth: int, heads: int, mlp_dim: int, rngs: nnx.Rngs, dropout: float = 0.0):
    self.max_images = max_images
    self.embed = nnx.Linear(patch_dim, width, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    # Factorized position embeddings: one table for patch rows, one for columns, summed.
    self.pos_row = nnx.Param(init(rngs.params(), (max_grid, width)))
    self.pos_col = nnx.Param(init(rngs.params(), (max_grid, width)))
    self.blocks = nnx.List([Block(width, heads, mlp_dim, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
    # Dropout on the pooled features (model.eval() turns it off; MC dropout keeps it on). Made last, and only
    # when used, so the other parameters and checkpoints are the same as without it.
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None

  def __call__(self, patches, patch_yx, segment_ids):
    """patches uint8 [B, L, P], patch_yx int32 [B, L, 2], segment_ids int32 [B, L] -> logits [B, M, C]."""
    x = self.embed(patches.astype(jnp.float32) / 127.5 - 1.0)
    x = x + self.pos_row[...][patch_yx[..., 0]] + self.pos_col[...][patch_yx[..., 1]]
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    for block in self.blocks:
      x = block(x, mask)
    x = self.norm(x)
    slots = (segment_ids[..., None] == jnp.arange(1, self.max_images + 1)).astype(x.dtype)  # [B, L, M]
    pooled = jnp.einsum("blm,bld->bmd", slots, x) / jnp.maximum(slots.sum(axis=1), 1.0)[..., None]
    return self.head(self.dropout(pooled) if self.dropout is not None else pooled)


def build_model(model_config: dict, info: dict, seed: int) -> NaViT:
  """The model for a dataset: every shape comes from dataset_info, the rest from the config."""
  return NaViT(patch_dim=info["patch_size"] ** 2 * 3, num_classes=info["num_classes"],
               max_images=info["max_images"], max_grid=info.get("max_patches_per_image", info["seq_len"]),
               width=model_config["width"], depth=model_config["depth"], heads=model_config["heads"],
               mlp_dim=model_config["mlp_dim"], rngs=nnx.Rngs(seed), dropout=model_config.get("dropout", 0.0))
