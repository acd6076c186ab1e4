"""STAR in Flax NNX: spatio-temporal action localisation with factorised tubelet queries over packed clips.

Batch (several clips packed along L per row, as NaViT packs images): `patches` [B, L, P*P*3], `patch_yx`
[B, L, 2], `patch_t` [B, L] (the sampled frame of each patch, 0..F-1), `segment_ids` [B, L] (0 padding, m for
video slot m); targets per slot: `tube_boxes` float32 [B, M, A, F, 4] (ymin, xmin, ymax, xmax in [0, 1]),
`tube_present` bool [B, M, A, F] (the actor is visible on frame f), `tube_labels` int32 [B, M, A] (-1: no actor).

Encoder: NaViT's blocks over every patch of every frame of a slot, attention masked by segment id, so packed
clips never see each other; position embeddings factorised and absolute: patch row + column + frame.

Decoder: STAR's factorised tubelet queries: Q spatial and F temporal query embeddings, query (q, f) = spatial_q +
temporal_f, so spatial query q followed over the F frames is one tubelet. Each decoder layer (pre-norm,
residual): self-attention among the Q*F queries of a slot, cross-attention to the encoder tokens of that slot
only (the same segment-masked attention function as the encoder), MLP.

Heads, per query and frame:
- box: sigmoid (cy, cx, h, w), returned as corners (ymin, xmin, ymax, xmax). The centre form keeps every box
  valid (ymin <= ymax) without a clip that would stop gradients; corners are what targets, GIoU and the
  detections use.
- logits over C + 1 classes, the last one "no action". The C action logits are the mean over frames of a
  per-frame linear head, so all frames of a tubelet share them: the actions here are told apart only over time
  (one frame says nothing of them), so every frame's evidence should vote on one label. The "no action" logit
  stays per frame: it is STAR's per-frame background, which says on which frames the tubelet's actor is absent.
  A tubelet's label is its argmax action; its frames are those where that label beats "no action".

Matching (per slot, the Hungarian problem solved exactly in JAX by trying every assignment, which is cheap for the
few actors of a clip: Q = 8 queries and A = 3 actors have 529 ways; no host callback in the jitted step, since
one hung the CPU runtime's queue, jax-ml/jax#25861): cost(q, a) = class + L1 + GIoU with DETR's weights 1, 5, 2.
- class: minus the probability that query q gives actor a's per-frame target, averaged over all F frames; the
  target is a's label where a is present and "no action" where absent, so this one term also charges for
  predicting an actor on frames where it is absent.
- L1 (of the corners, summed over the 4 coordinates) and minus GIoU, averaged over the frames where a is
  present: averaged, not summed, so a long tube weighs like a short one and the weights keep DETR's balance.
Padding actors (label -1) and empty slots are never matched; with more queries than actors the rest are
unmatched (and with more actors than queries, the actors left over get no loss).

Loss = class + L1 + (1 - GIoU), with the same weights (LOSS_WEIGHTS: DETR's 1, 5, 2):
- class: per-frame cross-entropy of every query of a filled slot against its per-frame target (unmatched queries:
  "no action" on every frame, down-weighted as DETR's "no object", by LOSS_WEIGHTS["no_action"]); a weighted mean.
- L1 and 1 - GIoU on matched queries' boxes at the frames where their actor is present, divided by the number
  of such (actor, frame) boxes in the batch.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from schemas.errors import ContractError
from trainers.model import DTYPES, Block, dense, layer_norm
from trainers.ops.attention import attention, segment_mask
from trainers.ops.boxes import center_to_corners, generalized_iou
from trainers.sharding import constrain

# DETR's weights, for the matching cost and the loss alike. "no_action" weighs unmatched queries' class loss:
# DETR's 0.1 is for ~100 queries to a handful of objects, where the unmatched queries together still weigh about
# as much as the matched ones; with ~8 spatial queries to 1-3 actors it takes about 0.3 for that balance, and
# less leaves duplicate tubelets (unmatched queries copying a matched one) slow to fade.
LOSS_WEIGHTS = {"class": 1.0, "l1": 5.0, "giou": 2.0, "no_action": 0.3}


class Attention(nnx.Module):
  """Multi-head attention of queries x over keys and values from memory (x itself for self-attention)."""

  def __init__(self, cfg: dict, *, rngs: nnx.Rngs):
    width = cfg["width"]
    self.heads = cfg["heads"]
    self.q = dense(width, width, cfg, rngs)
    self.kv = dense(width, 2 * width, cfg, rngs)
    self.out = dense(width, width, cfg, rngs)

  def __call__(self, x, memory, mask):
    """x [B, N, D], memory [B, K, D], mask [B, N, K] or None -> [B, N, D]."""
    b, n, width = x.shape
    d = width // self.heads
    q = self.q(x).reshape(b, n, self.heads, d)
    k, v = (t.reshape(b, memory.shape[1], self.heads, d) for t in jnp.split(self.kv(memory), 2, -1))
    return self.out(attention(q, k, v, mask).reshape(b, n, width))


class DecoderBlock(nnx.Module):

  def __init__(self, cfg: dict, *, rngs: nnx.Rngs):
    width = cfg["width"]
    self.norm1, self.norm2, self.norm3 = (layer_norm(width, cfg, rngs) for _ in range(3))
    self.self_attention = Attention(cfg, rngs=rngs)
    self.cross_attention = Attention(cfg, rngs=rngs)
    self.mlp_in = dense(width, cfg["mlp_dim"], cfg, rngs)
    self.mlp_out = dense(cfg["mlp_dim"], width, cfg, rngs)

  def __call__(self, x, memory, cross_mask):
    """x [B, M, N, D] (N queries per slot), memory [B, L, D], cross_mask [B, M*N, L] -> [B, M, N, D]."""
    b, m, n, width = x.shape
    y = self.norm1(x).reshape(b * m, n, width)  # a slot's queries see each other only: one row per slot
    x = x + self.self_attention(y, y, None).reshape(x.shape)
    y = self.norm2(x).reshape(b, m * n, width)
    x = x + self.cross_attention(y, memory, cross_mask).reshape(x.shape)
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm3(x))))


class ClipHead(nnx.Module):
  """A clip label per video slot: the mean of the slot's encoder tokens, then one linear layer (zero-initialised,
  as NaViT's head, so training starts from uniform predictions)."""

  def __init__(self, width: int, num_classes: int, *, rngs: nnx.Rngs):
    self.out = nnx.Linear(width, num_classes, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

  def __call__(self, tokens, segment_ids, num_slots: int):
    """tokens [B, L, D], segment_ids [B, L] -> logits [B, M, C] float32 (an empty slot pools nothing: bias only)."""
    slots = (segment_ids[..., None] == jnp.arange(1, num_slots + 1)).astype(jnp.float32)  # [B, L, M]
    pooled = jnp.einsum("blm,bld->bmd", slots, tokens.astype(jnp.float32))
    return self.out(pooled / jnp.maximum(slots.sum(axis=1), 1.0)[..., None])


class STAR(nnx.Module):
  """The encoder, STAR's tubelet decoder (unless num_classes is None) and, after them, one ClipHead per name of
  `clip_heads` ({name: classes}): heads of several tasks over one shared encoder (trainers/tasks/star_family.py).
  Without clip heads it is the STAR of the module docstring, its parameters drawn in the same order."""

  def __init__(self, cfg: dict, *, patch_dim: int, num_classes: int | None, max_videos: int, max_grid: int,
               num_frames: int, max_actors: int, rngs: nnx.Rngs, clip_heads: dict[str, int] | None = None):
    width = cfg["width"]
    self.num_classes, self.max_videos, self.num_frames = num_classes, max_videos, num_frames
    self.max_actors = max_actors  # A of its targets (schemas.shards.tubelet_arrays); no parameter depends on it
    self.dtype = DTYPES[cfg["dtype"]]
    init = nnx.initializers.normal(0.02)
    self.embed = dense(patch_dim, width, cfg, rngs)
    self.pos_row = nnx.Param(init(rngs.params(), (max_grid, width)))
    self.pos_col = nnx.Param(init(rngs.params(), (max_grid, width)))
    self.pos_time = nnx.Param(init(rngs.params(), (num_frames, width)))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg["depth"])])
    self.norm = layer_norm(width, cfg, rngs)
    if num_classes is not None:
      self._init_decoder(cfg, num_classes, rngs)
    self.clip_heads = nnx.Dict({name: ClipHead(width, n, rngs=rngs) for name, n in clip_heads.items()}) \
        if clip_heads else None

  def _init_decoder(self, cfg: dict, num_classes: int, rngs: nnx.Rngs):
    width = cfg["width"]
    # Queries start at unit scale (DETR's query embeddings): at 0.02 the first residual update would swamp
    # them, and queries that look alike predict alike (duplicate tubelets).
    query_init = nnx.initializers.normal(1.0)
    self.spatial_queries = nnx.Param(query_init(rngs.params(), (cfg["num_queries"], width)))
    self.temporal_queries = nnx.Param(query_init(rngs.params(), (self.num_frames, width)))
    self.decoder = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg["decoder_depth"])])
    self.decoder_norm = layer_norm(width, cfg, rngs)
    self.box_hidden = nnx.Linear(width, width, rngs=rngs)
    self.box_out = nnx.Linear(width, 4, rngs=rngs)
    self.class_head = nnx.Linear(width, num_classes + 1, rngs=rngs)

  def encode(self, patches, patch_yx, patch_t, segment_ids):
    """-> (tokens [B, L, D], the MoE layers' summed load-balancing loss; 0 for dense blocks)."""
    x = self.embed((patches.astype(jnp.float32) / 127.5 - 1.0).astype(self.dtype))
    position = self.pos_row[...][patch_yx[..., 0]] + self.pos_col[...][patch_yx[..., 1]] + self.pos_time[...][patch_t]
    x = x + position.astype(self.dtype)
    mask = segment_mask(segment_ids, segment_ids)
    aux_loss = jnp.zeros((), jnp.float32)
    for block in self.blocks:
      x, block_aux = block(constrain(x, "tokens"), mask, segment_ids > 0)
      aux_loss = aux_loss + block_aux
    return self.norm(x), aux_loss

  def classify_clips(self, patches, patch_yx, patch_t, segment_ids, head: str):
    """-> (logits [B, M, C] of clip head `head` per video slot, the MoE layers' load-balancing loss)."""
    tokens, aux_loss = self.encode(patches, patch_yx, patch_t, segment_ids)
    return self.clip_heads[head](tokens, segment_ids, self.max_videos), aux_loss

  def __call__(self, patches, patch_yx, patch_t, segment_ids):
    """-> {"boxes": [B, M, Q, F, 4] corners, "logits": [B, M, Q, F, C + 1], "slots": [B, M] (slot holds a clip),
    "aux_loss": MoE load balancing}, all float32 but "slots"."""
    memory, aux_loss = self.encode(patches, patch_yx, patch_t, segment_ids)
    b, m = segment_ids.shape[0], self.max_videos
    q, f = self.spatial_queries[...].shape[0], self.num_frames
    queries = (self.spatial_queries[...][:, None] + self.temporal_queries[...][None, :]).reshape(q * f, -1)
    x = jnp.broadcast_to(queries.astype(self.dtype), (b, m, q * f, queries.shape[-1]))
    query_slots = jnp.broadcast_to(jnp.repeat(jnp.arange(1, m + 1), q * f), (b, m * q * f))
    # An empty slot's queries see no key, so they attend evenly to everything (finite, see attention); nothing
    # reads them: the loss weighs them 0 and predict_tubelets skips the slot.
    cross_mask = segment_mask(query_slots, segment_ids)
    for block in self.decoder:
      x = block(x, memory, cross_mask)
    x = self.decoder_norm(x).astype(jnp.float32).reshape(b, m, q, f, -1)
    boxes = center_to_corners(jax.nn.sigmoid(self.box_out(jax.nn.gelu(self.box_hidden(x)))))
    frame_logits = self.class_head(x)
    actions = jnp.broadcast_to(frame_logits[..., :-1].mean(axis=3, keepdims=True), frame_logits[..., :-1].shape)
    logits = jnp.concatenate([actions, frame_logits[..., -1:]], axis=-1)
    slots = (segment_ids[:, None, :] == jnp.arange(1, m + 1)[:, None]).any(-1)
    return {"boxes": boxes, "logits": logits, "slots": slots, "aux_loss": aux_loss}


def build_star(model_config: dict, info: dict, seed: int) -> STAR:
  """The model for a video dataset: shapes from dataset_info (F = `max_frames`, A = `max_actors`)."""
  return STAR(model_config, patch_dim=info["patch_size"] ** 2 * 3, num_classes=info["num_classes"],
              max_videos=info["max_images"], max_grid=info.get("max_patches_per_image") or info["seq_len"],
              num_frames=info["max_frames"], max_actors=info["max_actors"],
              rngs=nnx.Rngs(params=seed, dropout=seed + 1))


# ------------------------------------------------------------------------------------------ matching, loss

def _frame_targets(labels, present, num_classes):
  """One-hot per-frame targets [..., A, F, C + 1]: the actor's label where present, "no action" (C) elsewhere."""
  return jax.nn.one_hot(jnp.where(present, jnp.maximum(labels, 0)[..., None], num_classes), num_classes + 1)


def match_cost(outputs, batch, weights=LOSS_WEIGHTS):
  """Cost of giving actor a to query q, [B, M, Q, A] (the module docstring defines it)."""
  num_classes = outputs["logits"].shape[-1] - 1
  present = batch["tube_present"].astype(jnp.float32)
  targets = _frame_targets(batch["tube_labels"], batch["tube_present"], num_classes)
  class_cost = -jnp.einsum("bmqfc,bmafc->bmqa", jax.nn.softmax(outputs["logits"]), targets) / present.shape[-1]
  frame_weights = present / jnp.maximum(present.sum(-1, keepdims=True), 1.0)  # mean over the present frames
  pred, true = outputs["boxes"][:, :, :, None], batch["tube_boxes"][:, :, None]  # [B, M, Q, 1, F, 4], [B, M, 1, A, F, 4]
  l1_cost = jnp.einsum("bmqaf,bmaf->bmqa", jnp.abs(pred - true).sum(-1), frame_weights)
  giou_cost = -jnp.einsum("bmqaf,bmaf->bmqa", generalized_iou(pred, true), frame_weights)
  return weights["class"] * class_cost + weights["l1"] * l1_cost + weights["giou"] * giou_cost


# The most assignments `match` tries per slot: ~30 MB of gathered costs for a batch of 16 x 4 slots x 3 actors.
MAX_ASSIGNMENTS = 40_000


@functools.cache
def assignments(num_queries: int, num_actors: int) -> np.ndarray:
  """Every way to give each of A actors its own query or none: int32 [K, A], -1 for none."""
  count = sum(math.comb(num_actors, k) * math.perm(num_queries, num_actors - k)
              for k in range(max(0, num_actors - num_queries), num_actors + 1))
  if count > MAX_ASSIGNMENTS:
    raise ContractError(f"matching: {num_queries} queries and {num_actors} actors a clip have {count} assignments, "
                        f"more than the {MAX_ASSIGNMENTS} that exact matching tries; use fewer")

  def extend(prefix):
    if len(prefix) == num_actors:
      yield prefix
      return
    for q in range(-1, num_queries):
      if q < 0 or q not in prefix:
        yield from extend(prefix + (q,))

  return np.array(list(extend(())), np.int32).reshape(-1, num_actors)


def assign(cost, matchable):
  """cost [B, M, Q, A], matchable [B, M, A] -> [B, M, A] int32: the query given to each actor, -1 for none. As
  scipy's linear_sum_assignment on each slot's matchable columns: as many of them as there are queries get one,
  at the least total cost (the tie first in `assignments` order wins)."""
  # A diverged model's NaN cost must not make every assignment NaN; the loss stays NaN all the same, which the
  # train loop reports with its step.
  cost = jnp.nan_to_num(cost, nan=0.0, posinf=1e9, neginf=-1e9)
  num_actors = matchable.shape[-1]
  table = assignments(cost.shape[2], num_actors)  # [K, A]
  none = jnp.asarray(table < 0)
  chosen = cost[:, :, np.maximum(table, 0), np.arange(num_actors)]  # [B, M, K, A]: cost of actor a's query
  matchable = matchable[:, :, None, :]
  total = jnp.where(matchable & ~none, chosen, 0.0).sum(-1)
  # Feasible: padding actors get no query. Among those, the fewest matchable actors left without one first.
  feasible = ~(~matchable & ~none).any(-1)
  missed = jnp.where(feasible, (matchable & none).sum(-1), num_actors + 1)
  total = jnp.where(missed == missed.min(-1, keepdims=True), total, jnp.inf)
  return jnp.asarray(table)[jnp.argmin(total, axis=-1)]


def match(outputs, batch, weights=LOSS_WEIGHTS):
  """Hungarian matching per slot -> [B, M, A] int32, the query matched to each actor (-1: padding actor, empty
  slot, or more actors than queries). No gradient flows through it."""
  cost = jax.lax.stop_gradient(match_cost(outputs, batch, weights))
  return assign(cost, (batch["tube_labels"] >= 0) & outputs["slots"][..., None])


def star_loss(outputs, batch, weights=LOSS_WEIGHTS):
  """-> (loss, {"class_loss", "l1_loss", "giou_loss", "matched"}) for the model's outputs against the batch's tubes."""
  logits, boxes = outputs["logits"], outputs["boxes"]
  num_queries, num_classes = logits.shape[2], logits.shape[-1] - 1
  matched = match(outputs, batch, weights)
  assignment = (matched[:, :, None, :] == jnp.arange(num_queries)[:, None]).astype(jnp.float32)  # [B, M, Q, A]
  query_matched = assignment.sum(-1)  # 1 or 0
  # Per-frame class targets of every query: its actor's, or "no action" on every frame when unmatched.
  actor_targets = _frame_targets(batch["tube_labels"], batch["tube_present"], num_classes)
  targets = (jnp.einsum("bmqa,bmafc->bmqfc", assignment, actor_targets)
             + (1.0 - query_matched)[..., None, None] * jax.nn.one_hot(num_classes, num_classes + 1))
  class_weights = jnp.where(query_matched > 0, 1.0, weights["no_action"]) * outputs["slots"][..., None]
  class_weights = jnp.broadcast_to(class_weights[..., None], logits.shape[:-1])
  cross_entropy = optax.softmax_cross_entropy(logits, targets)
  class_loss = (class_weights * cross_entropy).sum() / jnp.maximum(class_weights.sum(), 1e-9)
  # Boxes: matched queries at the frames where their actor is present.
  present = jnp.einsum("bmqa,bmaf->bmqf", assignment, batch["tube_present"].astype(jnp.float32))
  true_boxes = jnp.einsum("bmqa,bmafk->bmqfk", assignment, batch["tube_boxes"])
  num_boxes = jnp.maximum(present.sum(), 1.0)
  l1_loss = (jnp.abs(boxes - true_boxes).sum(-1) * present).sum() / num_boxes
  giou_loss = ((1.0 - generalized_iou(boxes, true_boxes)) * present).sum() / num_boxes
  loss = weights["class"] * class_loss + weights["l1"] * l1_loss + weights["giou"] * giou_loss
  return loss, {"class_loss": class_loss, "l1_loss": l1_loss, "giou_loss": giou_loss,
                "matched": query_matched.sum()}


# ------------------------------------------------------------------------------------------ detections

def predict_tubelets(outputs, score_threshold: float) -> list[list[list[dict]]]:
  """Detections per batch row and slot, best first: `detections[b][m]` is a list of
  {"label": int, "score": float, "boxes": [[f, ymin, xmin, ymax, xmax], ...]}, f the sampled-frame index (the
  caller maps it to source frames). A query's label is its argmax action; its frames are those where that label
  is more probable than "no action"; its score is the label's mean probability over those frames. Detections
  scoring under `score_threshold` and empty slots give nothing."""
  logits = np.asarray(outputs["logits"], np.float64)
  boxes = np.clip(np.asarray(outputs["boxes"], np.float64), 0.0, 1.0)
  slots = np.asarray(outputs["slots"])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  labels = logits[..., 0, :-1].argmax(-1)  # [B, M, Q]; the action logits are the same on every frame
  label_probs = np.take_along_axis(probs, labels[..., None, None], axis=-1)[..., 0]  # [B, M, Q, F]
  shown = label_probs > probs[..., -1]
  detections = [[[] for _ in range(slots.shape[1])] for _ in range(slots.shape[0])]
  for b, m, q in np.ndindex(labels.shape):
    frames = np.flatnonzero(shown[b, m, q])
    if not slots[b, m] or not frames.size:
      continue
    score = float(label_probs[b, m, q, frames].mean())
    if score >= score_threshold:
      detections[b][m].append({"label": int(labels[b, m, q]), "score": score,
                               "boxes": [[int(f), *map(float, boxes[b, m, q, f])] for f in frames]})
  for row in detections:
    for slot in row:
      slot.sort(key=lambda detection: -detection["score"])
  return detections
