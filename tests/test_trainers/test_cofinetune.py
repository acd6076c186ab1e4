"""Co-finetuning's trainer side: video classification on STAR's encoder, tasks of one family sharing one model
(a head per dataset), and train.init_from (pretrain, then finetune)."""

import json
import shutil

import numpy as np
import pytest
from flax import nnx

from schemas.errors import ContractError
from trainers import mixture
from trainers.checkpointing import params_sha256
from trainers.configs import apply_overrides, load_config
from trainers.input_pipeline import mixture_draws
from trainers.star import build_star
from trainers.tasks import star_family, video_classification
from trainers.tasks.task import Task
from trainers.train import init_from, load_trained_model, train

# 8 validation clips of 8 actions after a few steps: at chance, which these tests of the mechanics accept.
TINY = {"train.steps": 6, "train.checkpoint_every": 3, "train.log_every": 1, "train.batch_size": 4,
        "train.warmup_steps": 2, "model.width": 32, "model.depth": 1, "model.heads": 2, "model.mlp_dim": 64,
        "train.allow_useless_model": True}
MOVES = (0, 3, 4, 7)  # move_right, move_up, move_left, move_down; the other actions stay in place


def _build(manifest, out):
  from beam_jobs.build_shards import build_shards
  from beam_jobs.options import ShardOptions
  build_shards(str(manifest), str(out), ShardOptions(seq_len=256, patch_size=8, max_images=2, num_shards=1,
                                                     video=True, video_frames=8))
  return out


@pytest.fixture(scope="module")
def action_shards(tmp_path_factory):
  """The upstream set (8 actions), 16 + 8 clips of 8 frames at 32 px: two clips per packed sequence."""
  from beam_jobs.synthetic_actions import generate_action_classes
  out = tmp_path_factory.mktemp("actions")
  generate_action_classes(str(out), seed=0, splits={"train": 16, "val": 8}, frames=8, size=32)
  return _build(out / "manifest.jsonl", out / "shards")


@pytest.fixture(scope="module")
def moving_shards(action_shards):
  """The same clips under another label space (moving / in place), as a second dataset."""
  source = action_shards.parent
  out = source / "moving"
  out.mkdir()
  with open(source / "manifest.jsonl", encoding="utf-8") as f, \
      open(out / "manifest.jsonl", "w", encoding="utf-8") as g:
    for line in f:
      r = json.loads(line)
      g.write(json.dumps({**r, "video": str(source / r["video"]), "label": int(r["label"] not in MOVES)}) + "\n")
  (out / "classes.json").write_text(json.dumps({"class_names": ["moving", "in_place"]}))
  return _build(out / "manifest.jsonl", out / "shards")


def _config(**overrides):
  return apply_overrides(load_config("star_tiny"), {**TINY, **overrides})


def _mixture(actions, moving, **overrides):
  config = _config(**overrides)
  config["data"] = {"actions": 0.5, "moving": 0.5}
  config["datasets"] = {"actions": {"shards": str(actions), "task": "video_classification"},
                        "moving": {"shards": str(moving), "task": "video_classification"}}
  return config


def _losses(workdir):
  return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_video_classification_trains_on_the_star_encoder(action_shards, tmp_path):
  config = {**_config(**{"train.steps": 30, "train.warmup_steps": 5}), "task": "video_classification"}
  final = train(str(action_shards), str(tmp_path / "w"), config, log=lambda m: None)
  losses = _losses(tmp_path / "w")
  assert losses[0] == pytest.approx(np.log(8), abs=0.1)  # zero-initialised head: uniform over 8 actions
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
  assert final["val"]["clips"] == 8 and 0 <= final["val"]["accuracy"] <= 1
  model, _ = load_trained_model(str(tmp_path / "w"))
  assert set(model.clip_heads) == {"data"} and not hasattr(model, "decoder")  # no tubelet decoder to train


def test_clip_logits_see_time(action_shards):
  """The encoder has a frame embedding: the same patches in another frame order give other logits."""
  from schemas.shards import load_split
  datasets = mixture.datasets_of({"task": "video_classification"}, str(action_shards))
  model = star_family.build_model(_config()["model"], datasets, 0)
  head = model.clip_heads["data"]
  head.out.kernel[...] = nnx.initializers.normal(1.0)(nnx.Rngs(0).params(), head.out.kernel.shape)
  batch = load_split(str(action_shards), "val", fields=video_classification.FIELDS)
  logits, _ = video_classification.clip_logits(model, batch, datasets[0].head)
  reversed_time = {**batch, "patch_t": 7 - batch["patch_t"]}
  assert logits.shape == (4, 2, 8)
  assert not np.allclose(logits, video_classification.clip_logits(model, reversed_time, datasets[0].head)[0])


@pytest.mark.slow
def test_tasks_of_one_family_share_one_model_with_a_head_each(action_shards, moving_shards, tmp_path):
  config = _mixture(action_shards, moving_shards)
  final = train(None, str(tmp_path / "w"), config, log=lambda m: None)
  assert set(final["val"]) == {"actions", "moving"}
  drawn, _ = mixture_draws([0.5, 0.5], config["seed"], 6)
  rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert [row["dataset"] for row in rows] == [("actions", "moving")[d] for d in drawn]
  assert set(drawn.tolist()) == {0, 1}
  model, _ = load_trained_model(str(tmp_path / "w"))
  assert {name: head.out.kernel.shape for name, head in model.clip_heads.items()} == \
      {"actions": (32, 8), "moving": (32, 2)}


def _datasets_as(datasets, task_of):
  """The datasets, each read by task_of[name] (a stand-in for a task not in this branch's registry)."""
  return tuple(mixture.Dataset(d.name, d.shards, d.weight, task_of.get(d.name, d.task), d.head, d.info)
               for d in datasets)


def test_the_star_family_gives_a_tubelet_task_the_decoder_and_a_lone_one_build_stars_model(action_shards,
                                                                                           moving_shards):
  tubelets = Task(name="tubelets", fields=(), build_model=star_family.build_model, loss_options=dict, loss=None,
                  evaluate=None, family=star_family.FAMILY)
  model_config = _config()["model"]
  config = _mixture(action_shards, moving_shards)
  config = {**config, "data": {"actions": 1}, "datasets": {"actions": config["datasets"]["actions"]}}
  (alone,) = _datasets_as(mixture.datasets_of(config, None), {"actions": tubelets})
  built = star_family.build_model(model_config, (alone,), 0)
  assert built.clip_heads is None
  assert params_sha256(built) == params_sha256(build_star(model_config, alone.info, 0))
  both = _datasets_as(mixture.datasets_of(_mixture(action_shards, moving_shards), None), {"actions": tubelets})
  shared = star_family.build_model(model_config, both, 0)
  assert shared.class_head.kernel.shape == (32, 9) and set(shared.clip_heads) == {"moving"}
  with pytest.raises(ContractError, match=r"^datasets: heads actions, moving each need a tubelet decoder"):
    star_family.build_model(model_config, _datasets_as(both, {"moving": tubelets}), 0)


def test_tasks_of_different_families_are_refused(action_shards, shard_dir, tmp_path):
  config = _config()
  config["data"] = {"images": 1, "video": 1}
  config["datasets"] = {"images": {"shards": str(shard_dir)},
                        "video": {"shards": str(action_shards), "task": "video_classification"}}
  with pytest.raises(ContractError, match=r"^datasets\.video\.task: 'video_classification' trains a star model, "
                                          r"but images's 'classification' trains a navit model; one run trains one"):
    train(None, str(tmp_path / "w"), config, log=lambda m: None)


@pytest.fixture(scope="module")
def pretrained(action_shards, tmp_path_factory):
  """A finished video classification run on the 8 actions: the encoder to transfer."""
  workdir = tmp_path_factory.mktemp("pretrained")
  train(str(action_shards), str(workdir), {**_config(), "task": "video_classification"}, log=lambda m: None)
  return workdir


def test_init_from_loads_the_encoder_and_leaves_new_or_reshaped_heads(pretrained, action_shards, moving_shards):
  source, _ = load_trained_model(str(pretrained))
  config = {**_mixture(action_shards, moving_shards), "datasets": {
      "actions": {"shards": str(action_shards), "task": "video_classification"},
      "moving": {"shards": str(moving_shards), "task": "video_classification", "head": "data"}}}
  datasets = mixture.datasets_of(config, None)
  model = star_family.build_model(config["model"], datasets, 1)
  fresh = nnx.clone(model)
  logged = []
  found = init_from(model, str(pretrained), log=logged.append)
  for name in ("embed", "blocks", "norm"):  # the encoder: the pretrained run's
    assert params_sha256(getattr(model, name)) == params_sha256(getattr(source, name))
  np.testing.assert_array_equal(model.pos_time[...], source.pos_time[...])
  # A new head keeps its initial values; `data` (2 classes here, 8 there) is skipped and logged as such.
  assert found["left"] == ["clip_heads/actions/out/bias", "clip_heads/actions/out/kernel"]
  assert found["skipped"] == ["clip_heads/data/out/bias (8,) -> (2,)", "clip_heads/data/out/kernel (32, 8) -> (32, 2)"]
  assert len(found["loaded"]) == len(nnx.to_flat_state(nnx.state(model, nnx.Param))) - 4
  for name in ("actions", "data"):
    assert params_sha256(model.clip_heads[name]) == params_sha256(fresh.clip_heads[name])
  (line,) = logged
  assert line.startswith(f"train: init_from {pretrained}: loaded {len(found['loaded'])} parameters (")
  assert line.endswith("; left as initialised 2: clip_heads/actions/out/bias, clip_heads/actions/out/kernel; "
                       "skipped 2 (shape differs): clip_heads/data/out/bias (8,) -> (2,), "
                       "clip_heads/data/out/kernel (32, 8) -> (32, 2)")


def test_a_missing_init_from_is_one_error(action_shards, tmp_path):
  config = {**_config(**{"train.init_from": str(tmp_path / "nowhere")}), "task": "video_classification"}
  with pytest.raises(ContractError, match=r"^train\.init_from: '.*nowhere' holds no training run \(no config\.json\)$"):
    train(str(action_shards), str(tmp_path / "w"), config, log=lambda m: None)


@pytest.mark.slow
def test_a_finetuning_run_resumes_exactly_without_reapplying_init_from(pretrained, action_shards, moving_shards,
                                                                      tmp_path):
  config = _mixture(action_shards, moving_shards, **{"train.init_from": str(pretrained)})
  logs = []
  whole = train(None, str(tmp_path / "whole"), config, log=logs.append)
  assert sum(m.startswith("train: init_from") for m in logs) == 1
  shutil.copytree(tmp_path / "whole", tmp_path / "killed")
  shutil.rmtree(tmp_path / "killed" / "checkpoints" / "6")
  logs.clear()
  resumed = train(None, str(tmp_path / "killed"), config, log=logs.append)
  assert "train: resumed from checkpoint at step 3" in logs
  assert not any(m.startswith("train: init_from") for m in logs)
  assert resumed["params_sha256"] == whole["params_sha256"]
