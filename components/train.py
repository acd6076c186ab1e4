"""Train steps: one model from a config (`train`), or the models of a calibration-study size (`train_model`).

Both take the config the CLI takes (`config`: a name under trainers/configs or a path; `overrides`: dotted keys)
plus the pipeline's seed and its shortcut parameters (trainers.configs.SHORTCUTS; 0 keeps the config's value).
"""

from kfp.dsl import Dataset, Input, Model, Output

from components.image import component


@component
def train(shards: Input[Dataset], config: str, overrides: dict, seed: int, steps: int, batch_size: int,
          learning_rate: float, width: int, depth: int, checkpoint: Output[Model]):
  from components.step_cache import run_cached
  from trainers.configs import build_config
  resolved = build_config(config, {"seed": seed, **overrides}, steps=steps, batch_size=batch_size,
                          learning_rate=learning_rate, width=width, depth=depth)

  def work():
    from trainers.train import train as run_training
    return run_training(shards.path, checkpoint.path, resolved)
  final = run_cached("train", ("trainers", "schemas"), {"config": resolved}, {"shards": shards.path},
                     {"checkpoint": checkpoint.path}, work)
  checkpoint.metadata.update({"step": final["step"], "loss": final["loss"], "params_sha256": final["params_sha256"]})


@component
def train_model(shards: Input[Dataset], model: dict, config: str, overrides: dict, seed: int, steps: int,
                batch_size: int, learning_rate: float, checkpoints: Output[Model]):
  from components.step_cache import run_cached
  from trainers.configs import build_config
  resolved = build_config(config, {"seed": seed, **overrides}, steps=steps, batch_size=batch_size,
                          learning_rate=learning_rate)

  def work():
    from trainers.variants import train_model as run_training
    return run_training(shards.path, checkpoints.path, model, {}, config=resolved)
  records = run_cached("train_model", ("trainers", "schemas"), {"model": model, "config": resolved},
                       {"shards": shards.path}, {"checkpoints": checkpoints.path}, work)
  checkpoints.metadata.update({"model": model["name"], "methods": [r["variant"]["method"] for r in records],
                               "trainings": len({m["dir"] for r in records for m in r["members"]})})
