"""The data -> shards prefix of every pipeline: a synthetic source, then packed shards.

  @dsl.pipeline(name="smoke")
  @with_synthetic_shards("images", target)
  def smoke(shards: dsl.Dataset, seed: int, config: str = "smoke", ...) -> dsl.HTML: ...

The pipeline's parameters are the source's (its SOURCES entry: generator and shard parameters, with their
ranges) followed by the body's own (ranges: `@ranges` on the body, pipelines/parameters.py); the body receives the built shards and may ask for any source parameter by name (`seed`). The two
tasks keep their names (`make-<source>`, `build-shards`) in every pipeline, so targets.yaml and the step cache
treat them alike. Every task of the pipeline gets the runtime target's settings for its name (targets.yaml).
"""

import dataclasses
import functools
import inspect
import json

from kfp.dsl import pipeline_context

from components import data
from pipelines.parameters import ATTRIBUTE as RANGES_ATTRIBUTE
from pipelines.parameters import COUNT, SEED, Range
from pipelines.targets import configure_task

# The shard options every source exposes (ShardOptions checks them again in the step, the CLI's shards build too).
SHARD_RANGES = {"seq_len": COUNT, "patch_size": COUNT, "max_images": COUNT,
                "max_patches_per_image": Range(1, "seq_len"), "num_shards": COUNT}
# Every split has examples: the DAG trains on train, calibrates on val and evaluates on test.
SPLIT_RANGES = {"seed": SEED, "num_train": COUNT, "num_val": COUNT, "num_test": COUNT}


@dataclasses.dataclass(frozen=True)
class Source:
  make: object               # the component that writes the data set (manifest.jsonl and its files)
  defaults: dict             # the generator's parameters and their defaults
  shard_defaults: dict       # the shard options exposed as parameters (ShardOptions' defaults unless stated)
  ranges: dict               # parameter -> pipelines.parameters.Range, for every parameter above
  fixed_options: dict = dataclasses.field(default_factory=dict)  # shard options fixed for this source


SOURCES = {
    # Images of 1-3 shapes, up to 160 px: a per-image patch budget sized for them.
    "images": Source(data.make_synthetic_data,
                     {"seed": 0, "num_train": 600, "num_val": 150, "num_test": 150},
                     {**data.SHARD_DEFAULTS, "max_patches_per_image": 64}, {**SPLIT_RANGES, **SHARD_RANGES}),
    # Clips of 16 frames at 64 px, 8 sampled: 16 patches of 16 px per frame, 128 tokens per clip, 4 per sequence.
    "action_clips": Source(data.make_action_clips,
                           {"seed": 0, "num_train": 400, "num_val": 100, "num_test": 100, "frames": 16, "size": 64},
                           {**data.SHARD_DEFAULTS, "seq_len": 512, "max_images": 4, "max_patches_per_image": 128},
                           # the clip generator's minimums (beam_jobs.synthetic_actions MIN_FRAMES, MIN_SIZE)
                           {**SPLIT_RANGES, "frames": Range(8), "size": Range(32, multiple_of=2), **SHARD_RANGES},
                           {"video": True, "video_frames": 8}),
}


def synthetic_shards(source: str, target: dict | None, **values):
  """Adds the source's two tasks to the pipeline being defined; returns the build-shards task."""
  spec = SOURCES[source]
  made = spec.make(**{name: values[name] for name in spec.defaults})
  return data.build_shards(data=made.outputs["data"], **{name: values[name] for name in spec.shard_defaults},
                           beam_args=json.dumps((target or {}).get("beam_args", [])),
                           fixed_options=json.dumps(spec.fixed_options, sort_keys=True))


def with_synthetic_shards(source: str, target: dict | None):
  """Decorates a pipeline body `body(shards, ...)` into a pipeline function whose signature (which KFP reads)
  is the source's parameters, then the body's own after `shards`; then applies the runtime target's image and
  resources to every task of the pipeline by its name (None: as is)."""
  defaults = {**SOURCES[source].defaults, **SOURCES[source].shard_defaults}

  def decorate(body):
    body_parameters = list(inspect.signature(body).parameters.values())[1:]
    own = [p for p in body_parameters if p.name not in defaults]
    signature = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value, annotation=type(value))
         for name, value in defaults.items()] + own, return_annotation=inspect.signature(body).return_annotation)

    @functools.wraps(body)
    def pipeline(*args, **kwargs):
      values = signature.bind(*args, **kwargs)
      values.apply_defaults()
      shards = synthetic_shards(source, target, **values.arguments)
      output = body(shards.outputs["shards"], **{p.name: values.arguments[p.name] for p in body_parameters})
      for name, task in pipeline_context.Pipeline.get_default_pipeline().tasks.items():
        configure_task(task, name, target)
      return output

    pipeline.__signature__ = signature
    setattr(pipeline, RANGES_ATTRIBUTE, {**SOURCES[source].ranges, **getattr(body, RANGES_ATTRIBUTE, {})})
    pipeline.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return pipeline
  return decorate
