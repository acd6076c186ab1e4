"""NaViT in Flax NNX: packed sequences of patches from several images, attention masked by segment id so
images never see each other, per-image-slot pooling, one classification head.

Options follow ViT-22B's stable recipe: parallel attention+MLP blocks, LayerNorm on queries and keys, no
biases in projections and norms, bf16 compute over f32 parameters. Position embeddings are factorized (row
and column tables, summed) and either absolute (index = patch row/column) or fractional (index = position
relative to the image's own grid, NaViT's resolution-agnostic variant). Pooling is a masked mean (GAP) or
multihead attention pooling (MAP) with one learned probe, run per image slot.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from trainers.moe import MoEFeedForward
from trainers.ops.attention import attention, segment_mask
from trainers.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dense(din, dout, cfg, rngs, **kw):
  return nnx.Linear(din, dout, use_bias=cfg["use_bias"], dtype=DTYPES[cfg["dtype"]], rngs=rngs, **kw)


def layer_norm(dim, cfg, rngs):
  return nnx.LayerNorm(dim, use_bias=cfg["use_bias"], dtype=DTYPES[cfg["dtype"]], rngs=rngs)


class Block(nnx.Module):

  def __init__(self, cfg: dict, *, rngs: nnx.Rngs):
    width, heads = cfg["width"], cfg["heads"]
    if width % heads:
      raise ValueError(f"model.width ({width}) must be divisible by model.heads ({heads})")
    self.heads, self.parallel = heads, cfg["parallel_block"]
    self.norm1 = layer_norm(width, cfg, rngs)
    self.norm2 = None if self.parallel else layer_norm(width, cfg, rngs)
    self.qkv = dense(width, 3 * width, cfg, rngs)
    self.out = dense(width, width, cfg, rngs)
    self.q_norm = layer_norm(width // heads, cfg, rngs) if cfg["qk_norm"] else None
    self.k_norm = layer_norm(width // heads, cfg, rngs) if cfg["qk_norm"] else None
    moe = cfg.get("moe") or {}
    if moe.get("num_experts", 0):
      # Sparse mixture of experts in place of the dense MLP (Gemini-style MoE; router per issue "sparse top-k").
      self.moe = MoEFeedForward(width, cfg["mlp_dim"], moe["num_experts"], moe["k"], router=moe["router"],
                                capacity_factor=moe["capacity_factor"], rngs=rngs)
      self.mlp_in = self.mlp_out = None
    else:
      self.moe = None
      self.mlp_in = dense(width, cfg["mlp_dim"], cfg, rngs)
      self.mlp_out = dense(cfg["mlp_dim"], width, cfg, rngs)
    self.dropout = nnx.Dropout(cfg.get("dropout", 0.0), rngs=rngs)

  def _attend(self, y, mask):
    b, length, width = y.shape
    q, k, v = (constrain(t.reshape(b, length, self.heads, width // self.heads), "heads")
               for t in jnp.split(self.qkv(y), 3, -1))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return self.dropout(self.out(attention(q, k, v, mask).reshape(b, length, width)))

  def _mlp(self, y, token_mask):
    """-> (update, MoE load-balancing loss; 0 for a dense MLP)."""
    if self.moe is not None:
      update, aux = self.moe(y, token_mask)
      return self.dropout(update.astype(y.dtype)), aux["load_balancing_loss"]
    hidden = constrain(jax.nn.gelu(self.mlp_in(y)), "hidden")
    return self.dropout(self.mlp_out(hidden)), jnp.zeros((), jnp.float32)

  def __call__(self, x, mask, token_mask=None):
    """-> (x, auxiliary loss). The loss is returned, not sown, so no caller has to collect hidden state."""
    if self.parallel:  # ViT-22B: one norm, attention and MLP side by side, summed.
      y = self.norm1(x)
      update, aux = self._mlp(y, token_mask)
      return x + self._attend(y, mask) + update, aux
    x = x + self._attend(self.norm1(x), mask)
    update, aux = self._mlp(self.norm2(x), token_mask)
    return x + update, aux


class MAPHead(nnx.Module):
  """Multihead attention pooling: one learned probe attends to the tokens of each image slot."""

  def __init__(self, cfg: dict, *, rngs: nnx.Rngs):
    width = cfg["width"]
    self.heads = cfg["heads"]
    self.probe = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, width)))
    self.q = dense(width, width, cfg, rngs)
    self.kv = dense(width, 2 * width, cfg, rngs)
    self.out = dense(width, width, cfg, rngs)
    self.norm = layer_norm(width, cfg, rngs)
    self.mlp_in = dense(width, cfg["mlp_dim"], cfg, rngs)
    self.mlp_out = dense(cfg["mlp_dim"], width, cfg, rngs)

  def __call__(self, x, slots):
    """x [B, L, D], slots [B, L, M] one-hot slot membership -> [B, M, D]."""
    b, length, width = x.shape
    m, d = slots.shape[-1], width // self.heads
    q = jnp.broadcast_to(self.q(self.probe[...].astype(x.dtype)), (b, m, width)).reshape(b, m, self.heads, d)
    k, v = (t.reshape(b, length, self.heads, d) for t in jnp.split(self.kv(x), 2, -1))
    pooled = self.out(attention(q, k, v, jnp.swapaxes(slots, 1, 2) > 0).reshape(b, m, width))
    return pooled + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm(pooled))))


class NaViT(nnx.Module):

  def __init__(self, cfg: dict, *, patch_dim: int, num_classes: int, max_images: int, max_grid: int,
               rngs: nnx.Rngs):
    if cfg["posemb"] not in ("factorized", "fractional"):
      raise ValueError(f"model.posemb must be 'factorized' or 'fractional', got {cfg['posemb']!r}")
    if cfg["pool"] not in ("gap", "map"):
      raise ValueError(f"model.pool must be 'gap' or 'map', got {cfg['pool']!r}")
    width = cfg["width"]
    self.max_images, self.posemb, self.pool = max_images, cfg["posemb"], cfg["pool"]
    self.token_drop = cfg.get("token_drop", 0.0)
    # Fractional positions may use their own number of buckets; absolute ones need one row per grid index.
    self.num_pos = (cfg.get("posemb_buckets") or max_grid) if self.posemb == "fractional" else max_grid
    self.dtype = DTYPES[cfg["dtype"]]
    self.embed = dense(patch_dim, width, cfg, rngs)
    init = nnx.initializers.normal(0.02)
    self.pos_row = nnx.Param(init(rngs.params(), (self.num_pos, width)))
    self.pos_col = nnx.Param(init(rngs.params(), (self.num_pos, width)))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg["depth"])])
    self.norm = layer_norm(width, cfg, rngs)
    self.map_head = MAPHead(cfg, rngs=rngs) if self.pool == "map" else None
    self.head = nnx.Linear(width, num_classes, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.rngs = rngs if self.token_drop else None
    # Static (part of the graph definition, so jit retraces when it changes). False only to measure what
    # masking costs (benchmarks) or to show the mask matters (tests): images then see each other.
    self.mask_images = True

  def _positions(self, patch_yx, segment_ids, image_grid):
    if self.posemb == "factorized" or image_grid is None:
      return patch_yx[..., 0], patch_yx[..., 1]
    # Fractional: the patch's position as a fraction of its own image's grid, in num_pos buckets.
    grid = jnp.take_along_axis(image_grid, jnp.maximum(segment_ids - 1, 0)[..., None], axis=1)  # [B, L, 2]
    frac = patch_yx.astype(jnp.float32) / jnp.maximum(grid, 1).astype(jnp.float32)
    idx = jnp.clip((frac * self.num_pos).astype(jnp.int32), 0, self.num_pos - 1)
    return idx[..., 0], idx[..., 1]

  def __call__(self, patches, patch_yx, segment_ids, image_grid=None, *, train: bool = False,
               return_aux_loss: bool = False):
    """patches uint8 [B, L, P], patch_yx [B, L, 2], segment_ids [B, L], image_grid [B, M, 2] -> logits [B, M, C].

    With `return_aux_loss` -> (logits, the MoE layers' summed load-balancing loss; 0 for a dense model).
    """
    if train and self.token_drop:
      # Continuous token dropping at train time: dropped tokens become padding (segment 0).
      keep = jax.random.bernoulli(self.rngs.dropout(), 1.0 - self.token_drop, segment_ids.shape)
      segment_ids = jnp.where(keep, segment_ids, 0)
    x = self.embed((patches.astype(jnp.float32) / 127.5 - 1.0).astype(self.dtype))
    rows, cols = self._positions(patch_yx, segment_ids, image_grid)
    x = x + (self.pos_row[...][rows] + self.pos_col[...][cols]).astype(self.dtype)
    mask = None
    if self.mask_images:
      mask = segment_mask(segment_ids, segment_ids)
    aux_loss = jnp.zeros((), jnp.float32)
    for block in self.blocks:
      x, block_aux = block(constrain(x, "tokens"), mask, segment_ids > 0)
      aux_loss = aux_loss + block_aux
    x = self.norm(x)
    slots = (segment_ids[..., None] == jnp.arange(1, self.max_images + 1)).astype(x.dtype)  # [B, L, M]
    if self.pool == "map":
      pooled = self.map_head(x, slots)
    else:
      pooled = jnp.einsum("blm,bld->bmd", slots, x) / jnp.maximum(slots.sum(axis=1), 1.0)[..., None]
    logits = self.head(pooled.astype(jnp.float32))
    return (logits, aux_loss) if return_aux_loss else logits


def build_model(model_config: dict, info: dict, seed: int) -> NaViT:
  """The model for a dataset: every shape comes from dataset_info, the rest from the config."""
  return NaViT(model_config, patch_dim=info["patch_size"] ** 2 * 3, num_classes=info["num_classes"],
               max_images=info["max_images"], max_grid=info.get("max_patches_per_image", info["seq_len"]),
               rngs=nnx.Rngs(params=seed, dropout=seed + 1))
