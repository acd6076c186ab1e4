"""Evaluate steps: predictions and metrics (`evaluate`), calibration analysis (`calibrate`), and a calibration
study's evaluation of one model size by its uncertainty methods (`evaluate_model`)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import component


@component
def evaluate(shards: Input[Dataset], checkpoint: Input[Model], evaluation: Output[Dataset], metrics: Output[Metrics]):
  from components.step_cache import run_cached

  def work():
    from evaluators.predict import predict_and_evaluate
    return predict_and_evaluate(shards.path, checkpoint.path, evaluation.path)
  result = run_cached("evaluate", ("evaluators", "trainers", "schemas"), {},
                      {"shards": shards.path, "checkpoint": checkpoint.path}, {"evaluation": evaluation.path}, work)
  for split, values in result["splits"].items():
    for name in ("accuracy", "nll", "brier", "ece"):
      metrics.log_metric(f"{split}/{name}", values[name])


@component
def calibrate(evaluation: Input[Dataset], calibration: Output[Dataset], metrics: Output[Metrics]):
  import os
  from components.step_cache import run_cached

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
def evaluate_model(shards: Input[Dataset], checkpoints: Input[Model], evaluation: Output[Dataset]):
  from components.step_cache import run_cached

  def work():
    from evaluators.study import evaluate_model as run_evaluation
    return run_evaluation(shards.path, checkpoints.path, evaluation.path)
  rows = run_cached("evaluate_model", ("evaluators", "trainers", "schemas"), {},
                    {"shards": shards.path, "checkpoints": checkpoints.path}, {"evaluation": evaluation.path}, work)
  evaluation.metadata.update({"methods": [r["method"] for r in rows]})


@component
def evaluate_localisation(shards: Input[Dataset], checkpoint: Input[Model], evaluation: Output[Dataset],
                          metrics: Output[Metrics]):
  from components.step_cache import run_cached

  def work():
    from evaluators.tubelets import evaluate_localisation as run_evaluation
    return run_evaluation(shards.path, checkpoint.path, evaluation.path)
  result = run_cached("evaluate_localisation", ("evaluators", "trainers", "schemas"), {},
                      {"shards": shards.path, "checkpoint": checkpoint.path}, {"evaluation": evaluation.path}, work)
  for name in ("frame_map@0.5", "video_map@0.2", "video_map@0.5"):
    if result[name] is not None:
      metrics.log_metric(name, result[name])
