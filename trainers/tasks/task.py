"""What a task is to the train loop (`Task`), and one output of the model (`Head`).

A task is a record of functions, not a class to subclass: the loop calls them and knows nothing else of the
task. Every function that runs inside the jitted step takes its settings as static arguments, so a `Task`, a
`Head` and the loss options are hashable.
"""

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Head:
  """One output of the model, read by every dataset whose labels it predicts (one label space).

  The heads of one model family sit side by side in the model's output in name order: this head's classes are the
  outputs [offset, offset + num_classes). A model with one head has offset 0 and all of its outputs.
  """
  name: str
  num_classes: int
  offset: int = 0


def _unchanged(model, batch, head):
  return batch


@dataclasses.dataclass(frozen=True)
class Task:
  """The functions a task gives the loop; `datasets` are `trainers.mixture.Dataset`s (name, info, head, ...).

  name: its name in the registry (trainers/tasks/__init__.py).
  fields: the batch fields it reads, at train and eval time; `labels` among them (it marks the filled image
    slots, which the loop counts).
  build_model(model_config, datasets, seed) -> nnx.Module: one model for all these datasets, one head per
    distinct `dataset.head`, of the kind each head's task reads; every shape from `dataset.info`
    (dataset_info.json). It is the builder of the task's model family: every task of a family names the same one.
  loss_options(config) -> dict: the loss settings it reads from the config (hashable values; static in jit).
  loss(model, batch, head, **options) -> (scalar loss, {name: scalar metric}): jitted with the step, under
    `nnx.value_and_grad`. Host work inside it goes through `jax.pure_callback` on stop-gradient inputs; on
    CPU such a callback in the step can hang XLA's queue (jax-ml/jax#25861), so tubelets matches in JAX.
  evaluate(model, data, head, batch_size) -> {name: number}: the eval outputs on a loaded split (numpy arrays
    of `fields`), written to final.json.
  prepare(model, batch, head) -> batch: a host step before each train step, outside jit, on the batch's
    numpy arrays; it may run the model (e.g. to match predictions to targets), turn the shard's fields into
    the arrays the loss reads, and add fields for the loss.
  info_keys: the dataset_info keys its model is built from beyond every task's (trainers.mixture.SAVED_INFO_KEYS),
    which config.json keeps so that a trained model can be rebuilt without the shards.
  family: its model family ("navit": NaViT, trainers/model.py; "star": STAR's encoder, trainers/star.py). The
    datasets of one run may name different tasks of one family: they share one model, each through its head.
  accuracy: the eval output that is the fraction of labels it gets right (None: it has no labels); a usable
    model gets more than chance, 1 / the head's classes, on validation (the train loop checks it).
  """
  name: str
  fields: tuple[str, ...]
  build_model: Callable
  loss_options: Callable
  loss: Callable
  evaluate: Callable
  prepare: Callable = _unchanged
  info_keys: tuple[str, ...] = ()
  family: str = "navit"
  accuracy: str | None = None
