"""Data steps: the synthetic source and the shard builder."""

import dataclasses

from kfp.dsl import Dataset, Input, Output

from beam_jobs.options import ShardOptions
from components.image import component

# The shard options a pipeline exposes as parameters, with ShardOptions' defaults (declared there only).
SHARD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ShardOptions)
                  if f.name in ("seq_len", "patch_size", "max_images", "max_patches_per_image", "num_shards")}


@component
def make_synthetic_data(seed: int, num_train: int, num_val: int, num_test: int, data: Output[Dataset]):
  from components.step_cache import run_cached
  params = {"seed": seed, "splits": {"train": num_train, "val": num_val, "test": num_test}}

  def work():
    from beam_jobs.synthetic import generate_synthetic
    generate_synthetic(data.path, seed=seed, splits=params["splits"])
    return {}
  run_cached("make_synthetic_data", ("beam_jobs", "schemas"), params, {}, {"data": data.path}, work)


@component
def make_action_clips(seed: int, num_train: int, num_val: int, num_test: int, frames: int, size: int,
                      data: Output[Dataset]):
  from components.step_cache import run_cached
  params = {"seed": seed, "splits": {"train": num_train, "val": num_val, "test": num_test}, "frames": frames,
            "size": size}

  def work():
    from beam_jobs.synthetic_actions import generate_action_clips
    return generate_action_clips(data.path, **params, log=print)
  summary = run_cached("make_action_clips", ("beam_jobs", "schemas"), params, {}, {"data": data.path}, work)
  data.metadata.update({"clips": summary["clips"], "tubes": summary["tubes"]})


@component
def build_shards(data: Input[Dataset], seq_len: int, patch_size: int, max_images: int,
                 max_patches_per_image: int, num_shards: int, shards: Output[Dataset], beam_args: str = "[]",
                 fixed_options: str = "{}"):
  import json
  import os
  from components.step_cache import run_cached
  # fixed_options: shard options the pipeline definition fixes (a JSON object of ShardOptions fields, e.g. video).
  params = {"seq_len": seq_len, "patch_size": patch_size, "max_images": max_images,
            "max_patches_per_image": max_patches_per_image, "num_shards": num_shards, **json.loads(fixed_options)}

  def work():
    from beam_jobs.build_shards import build_shards as build
    from beam_jobs.options import ShardOptions
    # beam_args (a JSON list, from the runtime target) can send the job to Dataflow instead of in-process.
    return build(os.path.join(data.path, "manifest.jsonl"), shards.path, ShardOptions(**params),
                 beam_args=json.loads(beam_args))
  info = run_cached("build_shards", ("beam_jobs", "schemas"), params, {"data": data.path}, {"shards": shards.path},
                    work)
  shards.metadata.update({k: info[k] for k in ("num_examples", "num_sequences", "packing_efficiency")})
