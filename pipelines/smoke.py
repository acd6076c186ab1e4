"""The smoke DAG: every stage real and small; the defaults run in about 1.5 minutes on CPU.

  patchflow run smoke [--set steps=50] [--set config=navit_s16 --set 'overrides={"train.steps": 50}']

The model trained is `config` (a name under trainers/configs or a path) with the shortcut parameters
(steps, batch_size, learning_rate, width, depth; 0 keeps the config's value) and then `overrides` applied.
"""

from kfp import dsl

from components import evaluate as evaluate_steps
from components import report as report_steps
from components import train as train_steps
from pipelines.parameters import SHORTCUT, ranges
from pipelines.synthetic_shards import with_synthetic_shards


def build(target: dict | None = None):
  """The smoke pipeline, with a runtime target's image and resources applied to each step (None: as is)."""

  @dsl.pipeline(name="smoke", description="Synthetic multimodal data -> packed shards -> NaViT checkpoint -> "
                "predictions, calibration metrics -> report.html")
  @with_synthetic_shards("images", target)
  @ranges(steps=SHORTCUT, batch_size=SHORTCUT, learning_rate=SHORTCUT, width=SHORTCUT, depth=SHORTCUT)
  def smoke(shards: dsl.Dataset, seed: int, config: str = "smoke", overrides: dict = {}, steps: int = 0,
            batch_size: int = 0, learning_rate: float = 0.0, width: int = 0, depth: int = 0) -> dsl.HTML:
    checkpoint = train_steps.train(shards=shards, config=config, overrides=overrides, seed=seed, steps=steps,
                                   batch_size=batch_size, learning_rate=learning_rate, width=width,
                                   depth=depth).outputs["checkpoint"]
    evaluation = evaluate_steps.evaluate(shards=shards, checkpoint=checkpoint).outputs["evaluation"]
    calibration = evaluate_steps.calibrate(evaluation=evaluation).outputs["calibration"]
    return report_steps.report(shards=shards, checkpoint=checkpoint, evaluation=evaluation,
                               calibration=calibration).outputs["report"]

  return smoke


smoke = build()
