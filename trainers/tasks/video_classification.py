"""Video classification: one action label per video slot (the shards' `labels`), predicted from STAR's encoder
tokens of that slot (row, column and frame position embeddings: these actions differ only over time, which
NaViT's head cannot see), mean-pooled, through the slot's dataset's ClipHead. Cross-entropy (with label
smoothing) plus the MoE layers' load-balancing loss; accuracy and loss on evaluation splits.

A task of the STAR family (trainers/tasks/star_family.py): in a mixture with tubelet localisation its datasets
train the encoder that the tubelet decoder reads (co-finetuning), and a run of it alone pretrains that encoder
for `train.init_from`.
"""

import functools

from flax import nnx

from trainers.tasks import star_family
from trainers.tasks.classification import slot_loss_and_accuracy, slot_means
from trainers.tasks.task import Task

FIELDS = ("patches", "patch_yx", "patch_t", "segment_ids", "labels")


def clip_logits(model, batch, head):
  """-> (logits [B, M, head's classes], MoE load-balancing loss)."""
  return model.classify_clips(batch["patches"], batch["patch_yx"], batch["patch_t"], batch["segment_ids"], head.name)


def loss_options(config: dict) -> dict:
  return {"label_smoothing": config["train"]["label_smoothing"],
          "aux_weight": config["model"].get("moe", {}).get("aux_weight", 0.0)}


def loss(model, batch, head, label_smoothing: float = 0.0, aux_weight: float = 0.0):
  logits, aux = clip_logits(model, batch, head)
  cross_entropy, accuracy = slot_loss_and_accuracy(logits, batch["labels"], label_smoothing)
  return cross_entropy + aux_weight * aux, {"accuracy": accuracy}


@functools.partial(nnx.jit, static_argnames="head")
def eval_step(model, batch, head):
  return slot_loss_and_accuracy(clip_logits(model, batch, head)[0], batch["labels"])


def evaluate(model, data: dict, head, batch_size: int) -> dict:
  loss, accuracy, clips = slot_means(eval_step, model, data, head, batch_size, FIELDS)
  return {"loss": loss, "accuracy": accuracy, "clips": clips}


TASK = Task(name="video_classification", fields=FIELDS, build_model=star_family.build_model,
            loss_options=loss_options, loss=loss, evaluate=evaluate, family=star_family.FAMILY,
            info_keys=("video", "max_frames", "max_actors"), accuracy="accuracy")
