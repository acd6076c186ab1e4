"""NaViT's per-example options: resolution sampling and continuous token dropping.

Both are off by default. Every draw comes from a generator seeded by (job seed, a hash of the example id, a
stream number), so an example gets the same budget and the same dropped tokens on any worker, runner or run.
"""

import dataclasses
import math

import numpy as np

from beam_jobs.packing import stable_hash
from schemas.errors import ContractError

_BUDGET_STREAM, _DROP_STREAM = 1, 2


def example_rng(seed: int, example_id: str, stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, stable_hash(example_id), stream])


def _numbers(flag: str, text: str, parts: list[str], count: int) -> list[float]:
  if len(parts) != count:
    raise ContractError(f"{flag} {text!r}: expected {count} number(s) after {text.split(':')[0]!r}")
  try:
    return [float(p) for p in parts]
  except ValueError:
    raise ContractError(f"{flag} {text!r}: {':'.join(parts)!r} is not a list of numbers") from None


@dataclasses.dataclass(frozen=True)
class ResolutionSampling:
  """`none`, `uniform:LO:HI` or `loguniform:LO:HI`: each example's patch budget drawn from [LO, HI] patches;
  the image is then resized (up or down) to the largest grid within that budget that keeps its aspect ratio
  to within one patch. With `none` every image keeps its native size when it fits `max_patches_per_image`."""
  kind: str = "none"
  low: int = 0
  high: int = 0

  @classmethod
  def parse(cls, text: str) -> "ResolutionSampling":
    kind, *parts = text.strip().split(":")
    if kind == "none" and not parts:
      return cls()
    if kind not in ("uniform", "loguniform"):
      raise ContractError(f"--resolution-sampling {text!r}: expected none, uniform:LO:HI or loguniform:LO:HI")
    low, high = _numbers("--resolution-sampling", text, parts, 2)
    if low != int(low) or high != int(high) or not 1 <= low <= high:
      raise ContractError(f"--resolution-sampling {text!r}: LO and HI must be whole patch counts, 1 <= LO <= HI")
    return cls(kind, int(low), int(high))

  def __str__(self) -> str:
    return "none" if self.kind == "none" else f"{self.kind}:{self.low}:{self.high}"

  def budget(self, seed: int, example_id: str, max_patches: int) -> int | None:
    """The example's patch budget, or None when sampling is off."""
    if self.kind == "none":
      return None
    rng = example_rng(seed, example_id, _BUDGET_STREAM)
    if self.kind == "uniform":
      value = int(rng.integers(self.low, self.high + 1))
    else:
      value = int(math.floor(math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))))
    return max(1, min(value, self.high, max_patches))


@dataclasses.dataclass(frozen=True)
class TokenDrop:
  """`none`, `fixed:RATE`, `beta:A:B` (each example's rate drawn from Beta(A, B)) or `resolution:LO:HI` (the
  rate grows linearly with the example's token count, from LO at one patch to HI at `max_patches_per_image`).
  An example always keeps at least one token; kept tokens stay in raster order."""
  kind: str = "none"
  a: float = 0.0
  b: float = 0.0

  @classmethod
  def parse(cls, text: str) -> "TokenDrop":
    kind, *parts = text.strip().split(":")
    if kind == "none" and not parts:
      return cls()
    if kind == "fixed":
      (rate,) = _numbers("--token-drop", text, parts, 1)
      if not 0 <= rate < 1:
        raise ContractError(f"--token-drop {text!r}: the rate must be in [0, 1)")
      return cls(kind, rate)
    if kind == "beta":
      a, b = _numbers("--token-drop", text, parts, 2)
      if a <= 0 or b <= 0:
        raise ContractError(f"--token-drop {text!r}: Beta parameters must be > 0")
      return cls(kind, a, b)
    if kind == "resolution":
      low, high = _numbers("--token-drop", text, parts, 2)
      if not 0 <= low < 1 or not 0 <= high < 1:
        raise ContractError(f"--token-drop {text!r}: rates must be in [0, 1)")
      return cls(kind, low, high)
    raise ContractError(f"--token-drop {text!r}: expected none, fixed:RATE, beta:A:B or resolution:LO:HI")

  def __str__(self) -> str:
    if self.kind == "none":
      return "none"
    return f"fixed:{self.a:g}" if self.kind == "fixed" else f"{self.kind}:{self.a:g}:{self.b:g}"

  def rate(self, rng: np.random.Generator, num_tokens: int, max_patches: int) -> float:
    if self.kind == "fixed":
      return self.a
    if self.kind == "beta":
      return float(rng.beta(self.a, self.b))
    if self.kind == "resolution":
      t = 0.0 if max_patches <= 1 else min(1.0, (num_tokens - 1) / (max_patches - 1))
      return self.a + (self.b - self.a) * t
    return 0.0

  def kept_count(self, seed: int, example_id: str, num_tokens: int, max_patches: int) -> int:
    if self.kind == "none":
      return num_tokens
    rate = self.rate(example_rng(seed, example_id, _DROP_STREAM), num_tokens, max_patches)
    return max(1, min(num_tokens, int(round(num_tokens * (1.0 - rate)))))

  def kept_indices(self, seed: int, example_id: str, num_tokens: int, max_patches: int) -> np.ndarray:
    """Sorted indices of the tokens kept; the same draw as `kept_count`, so the two always agree."""
    keep = self.kept_count(seed, example_id, num_tokens, max_patches)
    if keep == num_tokens:
      return np.arange(num_tokens)
    rng = example_rng(seed, example_id, _DROP_STREAM)
    self.rate(rng, num_tokens, max_patches)  # advance past the rate draw, as kept_count did.
    return np.sort(rng.choice(num_tokens, size=keep, replace=False))
