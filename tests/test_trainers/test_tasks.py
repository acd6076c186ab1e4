"""The task registry, and the Task interface carrying a task whose loss needs the host (scipy's Hungarian
matching through jax.pure_callback) and a host step before each train step, as the tubelet task's will."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from schemas.errors import ContractError
from trainers import tasks
from trainers.configs import apply_overrides, load_config
from trainers.tasks import classification
from trainers.tasks.task import Task
from trainers.train import train

TINY = {"train.steps": 4, "train.checkpoint_every": 4, "train.log_every": 2, "train.batch_size": 4,
        "train.warmup_steps": 1, "model.width": 32, "model.depth": 1, "model.heads": 2, "model.mlp_dim": 32}


def test_unknown_task_is_one_error_naming_the_known_ones(shard_dir, tmp_path):
  assert tasks.get_task("classification") is classification.TASK
  with pytest.raises(ContractError,
                     match=r"^task: unknown task 'nope' \(known: classification, tubelets, video_classification\)$"):
    tasks.get_task("nope")
  config = {**apply_overrides(load_config("smoke"), TINY), "task": "nope"}
  with pytest.raises(ContractError,
                     match=r"^task: unknown task 'nope' \(known: classification, tubelets, video_classification\)$"):
    train(str(shard_dir), str(tmp_path / "w"), config, log=lambda m: None)


def _hungarian(cost):
  """Host side: per sequence, the target each image slot is matched to (min total cost)."""
  return np.stack([linear_sum_assignment(c)[1] for c in cost]).astype(np.int32)


def _set_loss(model, batch, head, host_calls):
  """Cross-entropy of each slot against the target the Hungarian matching gives it: the labels are a set."""
  log_p = jax.nn.log_softmax(classification.head_logits(classification.forward(model, batch, True), head))
  targets = batch["label_set"]  # [B, M], -1 = none
  cost = -jnp.einsum("bic,bjc->bij", log_p, jax.nn.one_hot(jnp.maximum(targets, 0), log_p.shape[-1]))
  cost = jnp.where(targets[:, None, :] >= 0, cost, 0.0)

  def match(cost):
    host_calls.append(len(cost))
    return _hungarian(np.asarray(cost))
  assignment = jax.pure_callback(match, jax.ShapeDtypeStruct(targets.shape, jnp.int32), jax.lax.stop_gradient(cost),
                                 vmap_method="sequential")
  matched = jnp.take_along_axis(cost, assignment[..., None], axis=-1)[..., 0]
  real = jnp.take_along_axis(targets, assignment, axis=-1) >= 0
  return jnp.where(real, matched, 0.0).sum() / jnp.maximum(real.sum(), 1), {"matched": real.sum()}


@pytest.mark.slow
def test_a_task_with_host_matching_in_its_loss_and_a_host_pre_step_trains(shard_dir, tmp_path, monkeypatch):
  host_calls, prepared = [], []

  def prepare(model, batch, head):
    """The labels as an unordered set: each sequence's filled labels, reversed; the loss must match them."""
    prepared.append(head.name)
    label_set = np.full_like(batch["labels"], -1)
    for row, labels in enumerate(batch["labels"]):
      filled = labels[labels >= 0][::-1]
      label_set[row, :len(filled)] = filled
    return {**batch, "label_set": label_set}

  set_task = Task(name="label_sets", fields=classification.FIELDS, build_model=classification.build_model,
                  loss_options=lambda config: {}, loss=lambda model, batch, head: _set_loss(model, batch, head, host_calls),
                  evaluate=classification.evaluate, prepare=prepare)
  monkeypatch.setitem(tasks.TASKS, "label_sets", set_task)
  config = {**apply_overrides(load_config("smoke"), TINY), "task": "label_sets"}
  final = train(str(shard_dir), str(tmp_path / "w"), config, log=lambda m: None)
  assert np.isfinite(final["loss"]) and final["val"]["images"] > 0
  assert prepared == ["data"] * 4          # once per step, outside jit, through the one head
  assert host_calls == [4] * 4             # the matching ran on the host at every step, on the whole batch
