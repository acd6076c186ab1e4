"""The calibration study DAG: synthetic data -> shards -> (ParallelFor over model/method variants: train ->
evaluate in distribution and at each shift level -> calibrate) -> study report (ECE vs accuracy in and out of
distribution, and an Uncertainty Baselines style leaderboard).

  patchflow run calibration_study                                   # defaults: 2 sizes x 4 methods
  patchflow run calibration_study --set steps=30 --set 'models=[{"name": "S", "width": 32, "depth": 1,
      "methods": [{"method": "deterministic", "temperature_scaling": true}]}]'

kfp 2.17.3's local runner executes dsl.ParallelFor (iterations under `<loop>-iteration-<i>/`) and
dsl.Collected of artifacts, so the same definition runs locally and on Vertex AI / Kubeflow.
"""

import json

from kfp import dsl

from components import calibration as calibration_steps
from components import smoke as step
from pipelines.targets import configure_task

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
  on = lambda task, name: configure_task(task, name, target)
  beam_args = json.dumps((target or {}).get("beam_args", []))

  @dsl.pipeline(name="calibration-study", description="Model sizes x uncertainty methods on the synthetic "
                "source: accuracy, NLL and ECE in distribution and under shift, leaderboard and ECE-vs-accuracy")
  def calibration_study(seed: int = 0, num_train: int = 600, num_val: int = 150, num_test: int = 150,
                        seq_len: int = 256, patch_size: int = 16, max_images: int = 16,
                        max_patches_per_image: int = 64, num_shards: int = 2, steps: int = 60,
                        batch_size: int = 16, learning_rate: float = 3e-3,
                        models: list = DEFAULT_MODELS) -> dsl.HTML:
    data = on(step.make_synthetic_data(seed=seed, num_train=num_train, num_val=num_val, num_test=num_test),
              "make-synthetic-data")
    shards = on(step.build_shards(data=data.outputs["data"], seq_len=seq_len, patch_size=patch_size,
                                  max_images=max_images, max_patches_per_image=max_patches_per_image,
                                  num_shards=num_shards, beam_args=beam_args), "build-shards")
    with dsl.ParallelFor(models, parallelism=PARALLELISM) as model:
      trained = on(calibration_steps.train_model(shards=shards.outputs["shards"], model=model, seed=seed,
                                                 steps=steps, batch_size=batch_size, learning_rate=learning_rate),
                   "train-model")
      evaluated = on(calibration_steps.evaluate_model(shards=shards.outputs["shards"],
                                                      checkpoints=trained.outputs["checkpoints"]), "evaluate-model")
    report = on(calibration_steps.study_report(evaluations=dsl.Collected(evaluated.outputs["evaluation"])),
                "study-report")
    return report.outputs["report"]

  return calibration_study


calibration_study = build()
