"""Checks a run's parameters before anything starts, so a bad one is one line now, not a failed step minutes in."""

from pipelines import registry
from pipelines.parameters import check_ranges


def check_parameters(pipeline, params: dict) -> None:
  """Every parameter (given or default) within the range its pipeline declares for it, then the train config
  of a pipeline that trains (`config`, `overrides`, the shortcut parameters), built as its train step will
  build it; raises ContractError naming the bad parameter or key. Types were checked when parsing."""
  values = {**{k: d for k, (_, d) in registry.signature(pipeline).items()}, **params}
  check_ranges(registry.parameter_ranges(pipeline), values)
  if "config" not in values or "overrides" not in values:
    return
  from trainers.configs import SHORTCUTS, build_config
  build_config(values["config"], {"seed": values.get("seed", 0), **values["overrides"]},
               **{name: values[name] for name in SHORTCUTS if name in values})
