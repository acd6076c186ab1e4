"""The steps of the smoke DAG: synthetic data -> shards -> checkpoint -> predictions/metrics -> report
(the calibrate step between evaluate and report is in components/calibration.py).

Each body: parse inputs, call one library function (through the local step cache), write outputs.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.image import PROJECT_IMAGE

# install_kfp_package=False: the project image already has kfp, and nothing may reach the network at run time.
component = dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)


@component
def make_synthetic_data(seed: int, num_train: int, num_val: int, num_test: int, data: Output[Dataset]):
  from components.cache import run_cached
  params = {"seed": seed, "splits": {"train": num_train, "val": num_val, "test": num_test}}

  def work():
    from beam_jobs.synthetic import generate_synthetic
    generate_synthetic(data.path, seed=seed, splits=params["splits"])
    return {}
  run_cached("make_synthetic_data", ("beam_jobs", "schemas"), params, {}, {"data": data.path}, work)


@component
def build_shards(data: Input[Dataset], seq_len: int, patch_size: int, max_images: int,
                 max_patches_per_image: int, num_shards: int, shards: Output[Dataset], beam_args: str = "[]"):
  import json
  import os
  from components.cache import run_cached
  params = {"seq_len": seq_len, "patch_size": patch_size, "max_images": max_images,
            "max_patches_per_image": max_patches_per_image, "num_shards": num_shards}

  def work():
    from beam_jobs.build_shards import build_shards as build
    from beam_jobs.options import ShardOptions
    # beam_args (a JSON list, from the runtime target) can send the job to Dataflow instead of in-process.
    return build(os.path.join(data.path, "manifest.jsonl"), shards.path, ShardOptions(**params),
                 beam_args=json.loads(beam_args))
  info = run_cached("build_shards", ("beam_jobs", "schemas"), params, {"data": data.path}, {"shards": shards.path},
                    work)
  shards.metadata.update({k: info[k] for k in ("num_examples", "num_sequences", "packing_efficiency")})


@component
def train(shards: Input[Dataset], seed: int, steps: int, batch_size: int, learning_rate: float, width: int,
          depth: int, checkpoint: Output[Model]):
  from components.cache import run_cached
  overrides = {"seed": seed, "train.steps": steps, "train.batch_size": batch_size,
               "train.learning_rate": learning_rate, "model.width": width, "model.depth": depth}

  def work():
    from trainers.configs import apply_overrides, load_config
    from trainers.train import train as run_training
    return run_training(shards.path, checkpoint.path, apply_overrides(load_config("smoke"), overrides))
  final = run_cached("train", ("trainers", "schemas"), overrides, {"shards": shards.path},
                     {"checkpoint": checkpoint.path}, work)
  checkpoint.metadata.update({"step": final["step"], "loss": final["loss"], "params_sha256": final["params_sha256"]})


@component
def evaluate(shards: Input[Dataset], checkpoint: Input[Model], evaluation: Output[Dataset], metrics: Output[Metrics]):
  from components.cache import run_cached

  def work():
    from evaluators.predict import predict_and_evaluate
    return predict_and_evaluate(shards.path, checkpoint.path, evaluation.path)
  result = run_cached("evaluate", ("evaluators", "trainers", "schemas"), {},
                      {"shards": shards.path, "checkpoint": checkpoint.path}, {"evaluation": evaluation.path}, work)
  for split, values in result["splits"].items():
    for name in ("accuracy", "nll", "brier", "ece"):
      metrics.log_metric(f"{split}/{name}", values[name])


@component
def report(shards: Input[Dataset], checkpoint: Input[Model], evaluation: Input[Dataset],
           calibration: Input[Dataset], report: Output[HTML]):
  from components.cache import run_cached

  def work():
    from evaluators.report import render_report
    return render_report(shards.path, checkpoint.path, evaluation.path, report.path, calibration.path)
  summary = run_cached("report", ("evaluators", "schemas"), {},
                       {"shards": shards.path, "checkpoint": checkpoint.path, "evaluation": evaluation.path,
                        "calibration": calibration.path}, {"report": report.path}, work)
  report.metadata.update(summary)
