"""The calibration study DAG: synthetic data -> shards -> (ParallelFor over model sizes: train each size's
uncertainty methods -> evaluate them in distribution and at each shift level -> calibrate) -> study report (ECE
vs accuracy in and out of distribution, and an Uncertainty Baselines style leaderboard).

  patchflow run calibration_study                                   # defaults: 2 sizes x 4 methods
  patchflow run calibration_study --set steps=30 --set 'models=[{"name": "S", "width": 32, "depth": 1,
      "methods": [{"method": "deterministic", "temperature_scaling": true}]}]'

Every size trains `config` (default smoke) with the shortcuts (steps, batch_size, learning_rate; 0 keeps the
config's value), then `overrides`, then the size's and method's own keys (trainers/variants.py).
kfp 2.17.3's local runner executes dsl.ParallelFor (iterations under `<loop>-iteration-<i>/`) and
dsl.Collected of artifacts, so the same definition runs locally and on Vertex AI / Kubeflow.
"""

from kfp import dsl

from components import evaluate as evaluate_steps
from components import report as report_steps
from components import train as train_steps
from pipelines.parameters import SHORTCUT, ranges
from pipelines.synthetic_shards import with_synthetic_shards

SIZES = {"S": {"width": 32, "depth": 1}, "M": {"width": 64, "depth": 2}}
METHODS = [{"method": "deterministic", "temperature_scaling": True},
           {"method": "label_smoothing", "label_smoothing": 0.1},
           {"method": "mc_dropout", "dropout": 0.2, "mc_samples": 8},
           {"method": "ensemble", "seeds": [0, 1, 2]}]
# One ParallelFor item per model size: its methods share one process (imports, compilation) and the
# deterministic model is the ensemble's seed-0 member (trainers/variants.py: 5 trainings per size, not 6).
DEFAULT_MODELS = [{"name": name, **size, "methods": METHODS} for name, size in SIZES.items()]
# Iterations at once under kfp.local (each trains JAX models on CPU); remote backends run them on machines.
PARALLELISM = 2


def build(target: dict | None = None):
  """The study pipeline, with a runtime target's image and resources applied to each step (None: as is)."""

  @dsl.pipeline(name="calibration-study", description="Model sizes x uncertainty methods on the synthetic "
                "source: accuracy, NLL and ECE in distribution and under shift, leaderboard and ECE-vs-accuracy")
  @with_synthetic_shards("images", target)
  @ranges(steps=SHORTCUT, batch_size=SHORTCUT, learning_rate=SHORTCUT)
  def calibration_study(shards: dsl.Dataset, seed: int, config: str = "smoke", overrides: dict = {},
                        steps: int = 60, batch_size: int = 0, learning_rate: float = 0.0,
                        models: list = DEFAULT_MODELS) -> dsl.HTML:
    with dsl.ParallelFor(models, parallelism=PARALLELISM) as model:
      trained = train_steps.train_model(shards=shards, model=model, config=config, overrides=overrides, seed=seed,
                                        steps=steps, batch_size=batch_size, learning_rate=learning_rate)
      evaluated = evaluate_steps.evaluate_model(shards=shards, checkpoints=trained.outputs["checkpoints"])
    return report_steps.study_report(evaluations=dsl.Collected(evaluated.outputs["evaluation"])).outputs["report"]

  return calibration_study


calibration_study = build()
