"""The range of every numeric pipeline parameter, declared next to the parameter, checked before a run exists.

A data source declares its parameters' ranges in its SOURCES entry (pipelines/synthetic_shards.py); a pipeline
body declares its own with `@ranges(...)` right above its signature:

  @dsl.pipeline(name="smoke")
  @with_synthetic_shards("images", target)
  @ranges(steps=SHORTCUT, batch_size=SHORTCUT, learning_rate=SHORTCUT, width=SHORTCUT, depth=SHORTCUT)
  def smoke(shards: dsl.Dataset, seed: int, config: str = "smoke", ..., steps: int = 0, ...): ...

The runner checks them (runner/preflight.py) after the types (pipelines/registry.py), with errors in the same
one-line form: `parameter 'seq_len': expected an int >= 1, got 0`. A bound may name another parameter
(`max_patches_per_image` at most `seq_len`). Every int and float parameter of a registered pipeline has a range
(tests/test_runner/test_parameters.py holds every pipeline to it).
"""

import dataclasses
import math

from schemas.errors import ContractError

ATTRIBUTE = "parameter_ranges"  # where a pipeline function keeps its ranges


@dataclasses.dataclass(frozen=True)
class Range:
  """low <= value <= high; `high` may name another parameter. Floats must be finite."""
  low: int | float | None = None
  high: int | float | str | None = None
  multiple_of: int = 1
  note: str = ""  # what a special value means, e.g. "0 keeps the config's value"

  def check(self, name: str, values: dict) -> None:
    value = values[name]
    high = values.get(self.high) if isinstance(self.high, str) else self.high
    if isinstance(value, float):
      fits = math.isfinite(value)
    else:
      fits = value % self.multiple_of == 0
    if fits and (self.low is None or value >= self.low) and (high is None or value <= high):
      return
    kind = "a finite float" if isinstance(value, float) else (
        "an even int" if self.multiple_of == 2 else "an int" + (f" multiple of {self.multiple_of}"
                                                                 if self.multiple_of > 1 else ""))
    shown_high = f"{self.high} = {high}" if isinstance(self.high, str) else f"{high}"
    bounds = (f" in [{self.low}, {shown_high}]" if self.low is not None and high is not None else
              f" >= {self.low}" if self.low is not None else f" <= {shown_high}" if high is not None else "")
    note = f" ({self.note})" if self.note else ""
    raise ContractError(f"parameter {name!r}: expected {kind}{bounds}{note}, got {value!r}")


# The train config's shortcut parameters (trainers/configs SHORTCUTS): 0 stands for the config's own value.
SHORTCUT = Range(0, note="0 keeps the config's value")
SEED = Range(0, 2**31 - 1)
COUNT = Range(1)


def ranges(**declared: Range):
  """Declares the ranges of a pipeline body's own parameters (a decorator, under with_synthetic_shards)."""
  def decorate(fn):
    setattr(fn, ATTRIBUTE, {**getattr(fn, ATTRIBUTE, {}), **declared})
    return fn
  return decorate


def check_ranges(declared: dict[str, Range], values: dict) -> None:
  """Raises ContractError naming the first parameter (in declaration order) outside its range."""
  for name, declared_range in declared.items():
    if name in values:
      declared_range.check(name, values)
