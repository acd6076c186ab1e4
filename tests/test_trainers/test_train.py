import json
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from schemas.dataset_info import read_dataset_info
from schemas.errors import ContractError
from schemas.shards import load_split
from trainers.configs import apply_overrides, load_config
from flax.core import FrozenDict
from trainers.input_pipeline import batch_indices
from trainers.model import build_model
from trainers.tasks import classification
from trainers.tasks.classification import FIELDS, slot_loss_and_accuracy
from trainers.tasks.task import Head
from trainers.train import load_trained_model, make_optimizer, train, train_step

TINY = {"train.steps": 6, "train.checkpoint_every": 3, "train.log_every": 2, "train.batch_size": 4,
        "train.warmup_steps": 2, "model.width": 32, "model.depth": 1, "model.heads": 2, "model.mlp_dim": 32}


def _config(**extra):
  return apply_overrides(load_config("smoke"), {**TINY, **extra})


def _step(model, optimizer, batch, info, **loss_options):
  """One classification train step through the model's only head."""
  return train_step(model, optimizer, batch, classification.TASK, Head("data", info["num_classes"]),
                    FrozenDict(loss_options))


def test_train_step_reduces_loss_on_a_fixed_batch(shard_dir):
  info = read_dataset_info(str(shard_dir))
  data = load_split(str(shard_dir), "train", info)
  batch = {k: data[k][:4] for k in FIELDS}
  config = _config(**{"train.learning_rate": 1e-2, "train.warmup_steps": 1, "train.steps": 30})
  model = build_model(config["model"], info, 0)
  optimizer, _ = make_optimizer(model, config["train"])
  losses = [float(_step(model, optimizer, batch, info)[0]) for _ in range(25)]
  assert losses[-1] < 0.5 * losses[0]


VARIANTS = {
    "default": {},
    "vit22b_recipe": {"model.parallel_block": True, "model.qk_norm": True, "model.use_bias": False},
    "fractional_map": {"model.posemb": "fractional", "model.posemb_buckets": 8, "model.pool": "map"},
    "bf16": {"model.dtype": "bfloat16"},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_images_in_one_sequence_never_see_each_other(shard_dir, variant):
  info = read_dataset_info(str(shard_dir))
  data = load_split(str(shard_dir), "train", info)
  row = int(np.argmax((data["labels"] >= 0).sum(1)))  # a sequence with several images
  batch = {k: data[k][row:row + 1] for k in FIELDS}
  assert (batch["labels"] >= 0).sum() >= 2
  model = build_model(_config(**VARIANTS[variant])["model"], info, 0)
  # A random head so logits depend on the (layer-normed, zero-mean) features; the trained head starts at zero.
  model.head.kernel[...] = jnp.asarray(np.random.default_rng(0).normal(size=model.head.kernel[...].shape),
                                       jnp.float32)
  run = lambda patches: np.asarray(model(patches, batch["patch_yx"], batch["segment_ids"], batch["image_grid"]))
  before = run(batch["patches"])
  changed = batch["patches"].copy()
  changed[batch["segment_ids"] == 1] = 255 - changed[batch["segment_ids"] == 1]
  after = run(changed)
  assert not np.allclose(before[0, 0], after[0, 0])          # image 1 itself changed
  tol = 1e-5  # masked-out keys get exactly zero weight, so even bf16 matches to float noise
  np.testing.assert_allclose(before[0, 1:], after[0, 1:], rtol=tol, atol=tol)  # the others did not
  # And without the mask they would have: the test can fail.
  model.mask_images = False
  assert not np.allclose(run(batch["patches"])[0, 1:], run(changed)[0, 1:], rtol=tol, atol=tol)


@pytest.mark.slow
def test_every_model_option_trains(shard_dir):
  info = read_dataset_info(str(shard_dir))
  data = load_split(str(shard_dir), "train", info)
  batch = {k: data[k][:4] for k in FIELDS}
  config = _config(**{**VARIANTS["vit22b_recipe"], **VARIANTS["fractional_map"], "model.token_drop": 0.25,
                      "model.dropout": 0.1, "train.label_smoothing": 0.1, "train.learning_rate": 1e-2,
                      "train.warmup_steps": 1, "train.steps": 30})
  model = build_model(config["model"], info, 0)
  optimizer, _ = make_optimizer(model, config["train"])
  model.train()
  losses = [float(_step(model, optimizer, batch, info, label_smoothing=0.1)[0]) for _ in range(25)]
  assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_loss_ignores_empty_slots():
  logits = jnp.array([[[5.0, 0.0], [0.0, 5.0], [100.0, -100.0]]])
  loss, accuracy = slot_loss_and_accuracy(logits, jnp.array([[0, 1, -1]]))
  assert float(accuracy) == 1.0 and float(loss) < 0.01


def test_batches_are_a_pure_function_of_seed_and_step():
  a = [batch_indices(10, 4, s, seed=1).tolist() for s in range(6)]
  assert a == [batch_indices(10, 4, s, seed=1).tolist() for s in range(6)]
  assert sorted(sum(a[:5], [])[:10]) == list(range(10))  # the first epoch covers every sequence once
  assert a != [batch_indices(10, 4, s, seed=2).tolist() for s in range(6)]


@pytest.mark.slow
def test_resume_from_last_checkpoint_gives_identical_parameters(shard_dir, tmp_path):
  config = _config()
  whole = train(str(shard_dir), str(tmp_path / "whole"), config, log=lambda m: None)
  assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
  # Simulate a run killed after step 3's checkpoint: drop later state and start the same command again.
  shutil.copytree(tmp_path / "whole", tmp_path / "killed")
  shutil.rmtree(tmp_path / "killed" / "checkpoints" / "6")
  (tmp_path / "killed" / "final.json").unlink()
  logs = []
  resumed = train(str(shard_dir), str(tmp_path / "killed"), config, log=logs.append)
  assert "train: resumed from checkpoint at step 3" in logs
  assert resumed["params_sha256"] == whole["params_sha256"]
  assert resumed["loss"] == whole["loss"]
  steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [2, 4, 6]
  model, saved = load_trained_model(str(tmp_path / "whole"))
  assert saved["config"]["train"]["steps"] == 6
  assert (tmp_path / "whole" / "lineage.json").exists()


def test_config_overrides_are_typed_and_unknown_keys_named():
  config = apply_overrides(load_config("smoke"), {"train.steps": "7", "train.learning_rate": "1"})
  assert config["train"]["steps"] == 7 and config["train"]["learning_rate"] == 1.0
  with pytest.raises(ContractError, match="unknown key 'stepz'"):
    apply_overrides(config, {"train.stepz": 1})
  with pytest.raises(ContractError, match="'train.steps': expected int"):
    apply_overrides(config, {"train.steps": "1.5"})
  with pytest.raises(ContractError, match="not a known name"):
    load_config("nope")


def test_unknown_schema_fingerprint_is_refused(shard_dir, tmp_path):
  shutil.copytree(shard_dir, tmp_path / "shards")
  info_path = tmp_path / "shards" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fingerprint"] = "0000"
  info_path.write_text(json.dumps(info))
  with pytest.raises(ContractError, match="fingerprint '0000' is unknown"):
    train(str(tmp_path / "shards"), str(tmp_path / "w"), _config())


@pytest.mark.slow
@pytest.mark.parametrize("router", ["softmax_topk", "sparse_topk"])
def test_moe_model_trains_with_either_router(shard_dir, router):
  info = read_dataset_info(str(shard_dir))
  data = load_split(str(shard_dir), "train", info)
  batch = {k: data[k][:4] for k in FIELDS}
  config = _config(**{"model.moe.num_experts": 4, "model.moe.k": 2, "model.moe.router": router,
                      "train.learning_rate": 1e-2, "train.warmup_steps": 1, "train.steps": 30})
  model = build_model(config["model"], info, 0)
  assert model.blocks[0].moe is not None and model.blocks[0].mlp_in is None
  # The load-balancing loss of every MoE layer reaches the training loss, weighted by aux_weight.
  logits, aux = model(batch["patches"], batch["patch_yx"], batch["segment_ids"], batch["image_grid"],
                      return_aux_loss=True)
  assert float(aux) > 0
  plain, _ = slot_loss_and_accuracy(logits, batch["labels"])
  optimizer, _ = make_optimizer(model, config["train"])
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)  # no Module.sow outside nnx.capture
    weighted = float(_step(model, optimizer, batch, info, aux_weight=0.5)[0])
  assert weighted == pytest.approx(float(plain) + 0.5 * float(aux), rel=1e-5)
  model.train()
  losses = [float(_step(model, optimizer, batch, info, aux_weight=0.01)[0]) for _ in range(20)]
  assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  # The isolation guarantee holds with experts too: routing is per token, padding is never routed.
  model.eval()
  logits = model(batch["patches"], batch["patch_yx"], batch["segment_ids"], batch["image_grid"])
  assert np.isfinite(np.asarray(logits)).all()
def test_label_smoothing_loss_hand_computed():
  logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
  loss, _ = slot_loss_and_accuracy(logits, jnp.array([[0, -1]]), label_smoothing=0.3)
  log_p = np.log(np.exp([2.0, 0.0, 0.0]) / np.exp([2.0, 0.0, 0.0]).sum())
  assert float(loss) == pytest.approx(-(0.8 * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2]), rel=1e-5)
  plain, _ = slot_loss_and_accuracy(logits, jnp.array([[0, -1]]))
  assert float(plain) == pytest.approx(-log_p[0], rel=1e-5)


@pytest.mark.slow
def test_dropout_is_off_in_eval_mode_and_leaves_the_initial_parameters_alone(shard_dir, tmp_path):
  from trainers.checkpointing import params_sha256
  info = read_dataset_info(str(shard_dir))
  data = load_split(str(shard_dir), "val", info)
  batch = [data[k][:2] for k in ("patches", "patch_yx", "segment_ids")]
  with_dropout = build_model({**_config()["model"], "dropout": 0.5}, info, 0)
  assert params_sha256(with_dropout) == params_sha256(build_model(_config()["model"], info, 0))
  with_dropout.head.kernel[...] = jnp.asarray(
      np.random.default_rng(0).normal(size=with_dropout.head.kernel[...].shape), jnp.float32)
  with_dropout.eval()
  np.testing.assert_array_equal(np.asarray(with_dropout(*batch)), np.asarray(with_dropout(*batch)))
  with_dropout.train()
  assert not np.allclose(np.asarray(with_dropout(*batch)), np.asarray(with_dropout(*batch)))
  config = _config(**{"model.dropout": 0.2, "train.label_smoothing": 0.1, "train.steps": 3})
  final = train(str(shard_dir), str(tmp_path / "w"), config, log=lambda m: None)
  assert np.isfinite(final["loss"])
  model, saved = load_trained_model(str(tmp_path / "w"))
  assert saved["config"]["model"]["dropout"] == 0.2
  np.testing.assert_array_equal(np.asarray(model(*batch)), np.asarray(model(*batch)))  # loaded in eval mode


@pytest.mark.slow
def test_a_refused_resume_leaves_the_earlier_runs_config_as_it_was(shard_dir, tmp_path):
  workdir = tmp_path / "w"
  train(str(shard_dir), str(workdir), _config(), log=lambda m: None)
  before = (workdir / "config.json").read_bytes()
  with pytest.raises(ContractError, match="batch_size"):
    train(str(shard_dir), str(workdir), _config(**{"train.batch_size": 2, "train.steps": 9}), log=lambda m: None)
  assert (workdir / "config.json").read_bytes() == before
