"""Classification: one label per image slot. NaViT's pooled logits, cross-entropy (with label smoothing) plus
the MoE layers' load-balancing loss; accuracy and loss on evaluation splits.

Several heads (datasets with different label spaces, co-finetuned) are one NaViT whose output layer holds
every head's classes side by side (`Head.offset`); a head's logits are its slice of the output. That is
exactly one linear head per dataset on the shared pooled features, and a model with one head is today's
NaViT, its parameters and checkpoints unchanged.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from schemas.errors import ContractError
from trainers import model as model_lib
from trainers.tasks.task import Task

FIELDS = ("patches", "patch_yx", "segment_ids", "image_grid", "labels")
# One model reads every dataset: these shapes must agree (the position tables grow to the largest grid).
SHARED_SHAPES = ("patch_size", "max_images")


def build_model(model_config: dict, datasets, seed: int) -> model_lib.NaViT:
  first = datasets[0]
  for dataset in datasets[1:]:
    for key in SHARED_SHAPES:
      if dataset.info[key] != first.info[key]:
        raise ContractError(f"datasets.{dataset.name}: {key} {dataset.info[key]} differs from "
                            f"{first.name}'s {first.info[key]}; one model reads both")
  heads = {dataset.head.name: dataset.head for dataset in datasets}.values()
  info = {**first.info, "num_classes": sum(head.num_classes for head in heads),
          "max_patches_per_image": max(d.info.get("max_patches_per_image", d.info["seq_len"]) for d in datasets)}
  return model_lib.build_model(model_config, info, seed)


def forward(model, batch, train: bool, return_aux_loss: bool = False):
  return model(batch["patches"], batch["patch_yx"], batch["segment_ids"], batch.get("image_grid"), train=train,
               return_aux_loss=return_aux_loss)


def head_logits(logits, head):
  """The head's classes of the model's logits [..., all heads' classes]."""
  if head.offset == 0 and head.num_classes == logits.shape[-1]:
    return logits  # the model's only head
  return logits[..., head.offset:head.offset + head.num_classes]


def slot_loss_and_accuracy(logits, labels, label_smoothing: float = 0.0):
  """Mean cross-entropy and accuracy over filled image slots (label >= 0); empty slots weigh nothing."""
  filled = labels >= 0
  safe = jnp.where(filled, labels, 0)
  targets = optax.smooth_labels(jax.nn.one_hot(safe, logits.shape[-1]), label_smoothing)
  losses = optax.softmax_cross_entropy(logits, targets)
  count = jnp.maximum(filled.sum(), 1)
  loss = jnp.where(filled, losses, 0.0).sum() / count
  accuracy = jnp.where(filled, logits.argmax(-1) == safe, False).sum() / count
  return loss, accuracy


def loss_options(config: dict) -> dict:
  return {"label_smoothing": config["train"]["label_smoothing"], "aux_weight": config["model"]["moe"]["aux_weight"]}


def loss(model, batch, head, label_smoothing: float = 0.0, aux_weight: float = 0.0):
  logits, aux = forward(model, batch, True, return_aux_loss=True)  # aux: MoE load balancing; 0 if dense
  cross_entropy, accuracy = slot_loss_and_accuracy(head_logits(logits, head), batch["labels"], label_smoothing)
  return cross_entropy + aux_weight * aux, {"accuracy": accuracy}


@functools.partial(nnx.jit, static_argnames="head")
def eval_step(model, batch, head):
  return slot_loss_and_accuracy(head_logits(forward(model, batch, False), head), batch["labels"])


def slot_means(eval_step, model, data: dict, head, batch_size: int, fields) -> tuple[float, float, int]:
  """(mean loss, accuracy, filled slots) over a loaded split, batch by batch through eval_step(model, batch, head)
  -> (loss, accuracy) over the batch's filled slots."""
  model.eval()
  total_loss = total_correct = total = 0.0
  for start in range(0, len(data["labels"]), batch_size):
    batch = {k: data[k][start:start + batch_size] for k in fields}
    n = float((batch["labels"] >= 0).sum())
    loss, accuracy = eval_step(model, batch, head)
    total_loss += float(loss) * n
    total_correct += float(accuracy) * n
    total += n
  return total_loss / max(total, 1), total_correct / max(total, 1), int(total)


def evaluate(model, data: dict, head, batch_size: int) -> dict:
  loss, accuracy, images = slot_means(eval_step, model, data, head, batch_size, FIELDS)
  return {"loss": loss, "accuracy": accuracy, "images": images}


TASK = Task(name="classification", fields=FIELDS, build_model=build_model, loss_options=loss_options, loss=loss,
            evaluate=evaluate, accuracy="accuracy")
