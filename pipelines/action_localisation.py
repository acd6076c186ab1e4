"""The action localisation DAG (STAR): synthetic action clips -> packed video shards with tubelets -> STAR
checkpoint -> detections, frame-mAP and video-mAP on the test split -> report.html with the tubelets drawn.

  patchflow run action_localisation [--set steps=600] [--set 'overrides={"model.num_queries": 12}']

The model trained is `config` (default star_tiny) with the shortcut parameters (0 keeps the config's value) and
then `overrides` applied, as in every pipeline that trains.
"""

from kfp import dsl

from components import evaluate as evaluate_steps
from components import report as report_steps
from components import train as train_steps
from pipelines.parameters import SHORTCUT, ranges
from pipelines.synthetic_shards import with_synthetic_shards


def build(target: dict | None = None):
  """The pipeline, with a runtime target's image and resources applied to each step (None: as is)."""

  @dsl.pipeline(name="action-localisation", description="Synthetic action clips -> video shards with tubelets "
                "-> STAR checkpoint -> frame-mAP and video-mAP -> report.html")
  @with_synthetic_shards("action_clips", target)
  @ranges(steps=SHORTCUT, batch_size=SHORTCUT, learning_rate=SHORTCUT)
  def action_localisation(shards: dsl.Dataset, seed: int, config: str = "star_tiny", overrides: dict = {},
                          steps: int = 0, batch_size: int = 0, learning_rate: float = 0.0) -> dsl.HTML:
    checkpoint = train_steps.train(shards=shards, config=config, overrides=overrides, seed=seed, steps=steps,
                                   batch_size=batch_size, learning_rate=learning_rate, width=0,
                                   depth=0).outputs["checkpoint"]
    evaluation = evaluate_steps.evaluate_localisation(shards=shards, checkpoint=checkpoint).outputs["evaluation"]
    return report_steps.localisation_report(shards=shards, checkpoint=checkpoint,
                                            evaluation=evaluation).outputs["report"]

  return action_localisation


action_localisation = build()
