"""Calibration steps: `calibrate` (in the smoke DAG between evaluate and report) and the steps of the
calibration_study DAG (train a variant, evaluate it by its uncertainty method, report the study)."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.image import PROJECT_IMAGE

# install_kfp_package=False: the project image already has kfp, and nothing may reach the network at run time.
component = dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)


@component
def calibrate(evaluation: Input[Dataset], calibration: Output[Dataset], metrics: Output[Metrics]):
  import os
  from components.cache import run_cached

  def work():
    from evaluators.calibration import calibrate as run_calibration
    return run_calibration(os.path.join(evaluation.path, "predictions.parquet"), calibration.path)
  result = run_cached("calibrate", ("evaluators", "schemas"), {}, {"evaluation": evaluation.path},
                      {"calibration": calibration.path}, work)
  for name in ("accuracy", "nll", "brier", "ece", "ece_equal_mass", "rms_ce", "classwise_ece", "temperature",
               "ece_temperature_scaled", "calibration_auc"):
    if result[name] is not None:
      metrics.log_metric(name, result[name])


@component
def train_model(shards: Input[Dataset], model: dict, seed: int, steps: int, batch_size: int,
                learning_rate: float, checkpoints: Output[Model]):
  from trainers.variants import train_model as run_training
  records = run_training(shards.path, checkpoints.path, model, {
      "seed": seed, "train.steps": steps, "train.batch_size": batch_size, "train.learning_rate": learning_rate})
  checkpoints.metadata.update({"model": model["name"], "methods": [r["variant"]["method"] for r in records],
                               "trainings": len({m["dir"] for r in records for m in r["members"]})})


@component
def evaluate_model(shards: Input[Dataset], checkpoints: Input[Model], evaluation: Output[Dataset]):
  from evaluators.study import evaluate_model as run_evaluation
  rows = run_evaluation(shards.path, checkpoints.path, evaluation.path)
  evaluation.metadata.update({"methods": [r["method"] for r in rows]})


@component
def study_report(evaluations: Input[List[Dataset]], report: Output[HTML]):
  from evaluators.study import render_study_report
  rows = render_study_report([e.path for e in evaluations], report.path)
  report.metadata.update({"rows": len(rows)})
