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
  from evaluators.calibration import calibrate as run_calibration
  result = run_calibration(os.path.join(evaluation.path, "predictions.parquet"), calibration.path)
  for name in ("accuracy", "nll", "brier", "ece", "ece_equal_mass", "rms_ce", "classwise_ece", "temperature",
               "ece_temperature_scaled", "calibration_auc"):
    if result[name] is not None:
      metrics.log_metric(name, result[name])
