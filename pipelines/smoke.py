"""The smoke DAG: every stage real and small. Its parameters carry every knob; defaults run in ~1.5 min on CPU."""

import json

from kfp import dsl

from components import calibration as calibration_steps
from components import smoke as step
from pipelines.targets import configure_task


def build(target: dict | None = None):
  """The smoke pipeline, with a runtime target's image and resources applied to each step (None: as is)."""
  on = lambda task, name: configure_task(task, name, target)
  beam_args = json.dumps((target or {}).get("beam_args", []))

  @dsl.pipeline(name="smoke", description="Synthetic multimodal data -> packed shards -> NaViT checkpoint -> "
                "predictions, calibration metrics -> report.html")
  def smoke(seed: int = 0, num_train: int = 600, num_val: int = 150, num_test: int = 150,
            seq_len: int = 256, patch_size: int = 16, max_images: int = 16, max_patches_per_image: int = 64,
            num_shards: int = 2, steps: int = 120, batch_size: int = 16, learning_rate: float = 3e-3,
            width: int = 64, depth: int = 2) -> dsl.HTML:
    data = on(step.make_synthetic_data(seed=seed, num_train=num_train, num_val=num_val, num_test=num_test),
              "make-synthetic-data")
    shards = on(step.build_shards(data=data.outputs["data"], seq_len=seq_len, patch_size=patch_size,
                                  max_images=max_images, max_patches_per_image=max_patches_per_image,
                                  num_shards=num_shards, beam_args=beam_args), "build-shards")
    checkpoint = on(step.train(shards=shards.outputs["shards"], seed=seed, steps=steps, batch_size=batch_size,
                               learning_rate=learning_rate, width=width, depth=depth), "train")
    evaluation = on(step.evaluate(shards=shards.outputs["shards"], checkpoint=checkpoint.outputs["checkpoint"]),
                    "evaluate")
    calibration = on(calibration_steps.calibrate(evaluation=evaluation.outputs["evaluation"]), "calibrate")
    report = on(step.report(shards=shards.outputs["shards"], checkpoint=checkpoint.outputs["checkpoint"],
                            evaluation=evaluation.outputs["evaluation"],
                            calibration=calibration.outputs["calibration"]), "report")
    return report.outputs["report"]

  return smoke


smoke = build()
