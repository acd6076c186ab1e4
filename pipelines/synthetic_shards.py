"""The data -> shards prefix of every pipeline: the synthetic source, then packed shards.

  @dsl.pipeline(name="smoke")
  @with_synthetic_shards(target)
  def smoke(shards: dsl.Dataset, seed: int, config: str = "smoke", ...) -> dsl.HTML: ...

The pipeline's parameters are the data parameters (DEFAULTS) followed by the body's own; the body receives the
built shards and may ask for any data parameter by name (`seed`). The two tasks keep their names
(`make-synthetic-data`, `build-shards`) in every pipeline, so targets.yaml and the step cache treat them alike.
"""

import functools
import inspect
import json

from components import data
from pipelines.targets import configure_task

# Parameter defaults of every pipeline that starts from the synthetic source; the shard options' defaults are
# ShardOptions' own, except a per-image patch budget sized for these small images.
DEFAULTS = {"seed": 0, "num_train": 600, "num_val": 150, "num_test": 150,
            **data.SHARD_DEFAULTS, "max_patches_per_image": 64}


def synthetic_shards(target: dict | None, seed, num_train, num_val, num_test, seq_len, patch_size, max_images,
                     max_patches_per_image, num_shards):
  """Adds the two tasks to the pipeline being defined; returns the build-shards task."""
  source = configure_task(data.make_synthetic_data(seed=seed, num_train=num_train, num_val=num_val,
                                                   num_test=num_test), "make-synthetic-data", target)
  return configure_task(data.build_shards(
      data=source.outputs["data"], seq_len=seq_len, patch_size=patch_size, max_images=max_images,
      max_patches_per_image=max_patches_per_image, num_shards=num_shards,
      beam_args=json.dumps((target or {}).get("beam_args", []))), "build-shards", target)


def with_synthetic_shards(target: dict | None):
  """Decorates a pipeline body `body(shards, ...)` into a pipeline function whose signature (which KFP reads)
  is DEFAULTS' parameters, then the body's own after `shards`."""
  def decorate(body):
    body_parameters = list(inspect.signature(body).parameters.values())[1:]
    own = [p for p in body_parameters if p.name not in DEFAULTS]
    signature = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value, annotation=type(value))
         for name, value in DEFAULTS.items()] + own, return_annotation=inspect.signature(body).return_annotation)

    @functools.wraps(body)
    def pipeline(*args, **kwargs):
      values = signature.bind(*args, **kwargs)
      values.apply_defaults()
      shards = synthetic_shards(target, **{name: values.arguments[name] for name in DEFAULTS})
      return body(shards.outputs["shards"], **{p.name: values.arguments[p.name] for p in body_parameters})

    pipeline.__signature__ = signature
    pipeline.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return pipeline
  return decorate
