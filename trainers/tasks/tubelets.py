"""Tubelets (STAR): spatio-temporal action localisation on packed clips (trainers/star.py).

The shards carry each slot's tubes as bytes (`frame_t`, `tube_labels`, `tube_boxes`, `tube_present`); the
host step `prepare` turns them into the padded arrays the loss reads (schemas.shards.tubelet_arrays, padded to
the model's F frames and A actors, so every batch has one shape and the step compiles once). The loss is
STAR's: Hungarian matching (exact, in JAX) inside the jitted step, then class + L1 + GIoU with the config's
`loss` weights. On an evaluation split: the loss at DETR's weights (trainers.star.LOSS_WEIGHTS), and how
many true actors the matched query labels right (`actor_accuracy`) and how well it boxes them (`box_iou`, the
mean IoU over the actors' present frames), which say more of progress than the loss alone.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from schemas.shards import tubelet_arrays
from trainers import star
from trainers.ops.boxes import iou
from trainers.tasks import star_family
from trainers.tasks.task import Task

MODEL_FIELDS = ("patches", "patch_yx", "patch_t", "segment_ids")
FIELDS = (*MODEL_FIELDS, "labels", "frame_t", "tube_labels", "tube_boxes", "tube_present")
TARGETS = ("tube_labels", "tube_boxes", "tube_present")


def prepare(model, batch: dict, head) -> dict:
  """The model's fields and the padded tube targets of a batch of shard fields."""
  tubes = tubelet_arrays(batch, {"max_frames": model.num_frames, "max_actors": model.max_actors})
  return {**{k: batch[k] for k in MODEL_FIELDS}, **{k: tubes[k] for k in TARGETS}}


def forward(model, batch):
  return model(batch["patches"], batch["patch_yx"], batch["patch_t"], batch["segment_ids"])


def loss_options(config: dict) -> dict:
  moe = config["model"].get("moe") or {}
  return {**config["loss"], "aux_weight": moe.get("aux_weight", 0.0) if moe.get("num_experts") else 0.0}


def loss(model, batch, head, aux_weight: float = 0.0, **weights):
  outputs = forward(model, batch)
  total, metrics = star.star_loss(outputs, batch, weights)
  return total + aux_weight * outputs["aux_loss"], metrics


@nnx.jit
def eval_step(model, batch):
  """-> (loss, filled slots, true actors, actors labelled right, sum of their mean box IoUs)."""
  outputs = forward(model, batch)
  total, _ = star.star_loss(outputs, batch)
  matched = star.match(outputs, batch)  # [B, M, A]: the query of each actor, -1 for none
  query = jnp.maximum(matched, 0)
  labels = jnp.take_along_axis(outputs["logits"][:, :, :, 0, :-1].argmax(-1), query, axis=2)  # [B, M, A]
  boxes = jnp.take_along_axis(outputs["boxes"], query[..., None, None], axis=2)  # [B, M, A, F, 4]
  present = batch["tube_present"].astype(jnp.float32)
  box_iou = (iou(boxes, batch["tube_boxes"]) * present).sum(-1) / jnp.maximum(present.sum(-1), 1.0)
  real = (batch["tube_labels"] >= 0) & (matched >= 0)
  return (total, outputs["slots"].sum(), (batch["tube_labels"] >= 0).sum(),
          (real & (labels == batch["tube_labels"])).sum(), jnp.where(real, box_iou, 0.0).sum())


def evaluate(model, data: dict, head, batch_size: int) -> dict:
  model.eval()
  sums = np.zeros(5)
  for start in range(0, len(data["labels"]), batch_size):
    batch = prepare(model, {k: data[k][start:start + batch_size] for k in FIELDS}, head)
    total, clips, actors, correct, box_iou = (float(v) for v in eval_step(model, batch))
    sums += [total * clips, clips, actors, correct, box_iou]
  clips, actors = max(sums[1], 1.0), max(sums[2], 1.0)
  return {"loss": sums[0] / clips, "actor_accuracy": sums[3] / actors, "box_iou": sums[4] / actors,
          "clips": int(sums[1]), "actors": int(sums[2])}


# The STAR family builds the model: a tubelets-only run gets exactly build_star's model.
TASK = Task(name="tubelets", fields=FIELDS, build_model=star_family.build_model, loss_options=loss_options,
            loss=loss, evaluate=evaluate, prepare=prepare, info_keys=("video", "max_frames", "max_actors"),
            family=star_family.FAMILY, accuracy="actor_accuracy")
