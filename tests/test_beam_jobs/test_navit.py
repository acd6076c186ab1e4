import numpy as np
import pytest

from beam_jobs.navit import ResolutionSampling, TokenDrop
from schemas.errors import ContractError


@pytest.mark.parametrize("text, expected", [
    ("none", ResolutionSampling()),
    ("uniform:16:64", ResolutionSampling("uniform", 16, 64)),
    ("loguniform:4:256", ResolutionSampling("loguniform", 4, 256)),
])
def test_resolution_sampling_parses(text, expected):
  assert ResolutionSampling.parse(text) == expected
  assert str(ResolutionSampling.parse(text)) == text


@pytest.mark.parametrize("text, message", [
    ("uniform:16", "expected 2 number"),
    ("uniform:a:b", "not a list of numbers"),
    ("uniform:64:16", "1 <= LO <= HI"),
    ("uniform:1.5:16", "whole patch counts"),
    ("gaussian:1:2", "expected none, uniform"),
])
def test_resolution_sampling_rejects_bad_specs_in_one_line(text, message):
  with pytest.raises(ContractError, match=message) as e:
    ResolutionSampling.parse(text)
  assert str(e.value).startswith(f"--resolution-sampling {text!r}") and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["uniform", "loguniform"])
def test_budget_is_seeded_by_example_id_and_stays_in_range(kind):
  sampling = ResolutionSampling.parse(f"{kind}:8:64")
  budgets = [sampling.budget(0, f"id{i}", 256) for i in range(2000)]
  assert budgets == [sampling.budget(0, f"id{i}", 256) for i in range(2000)]  # same id, same budget
  assert min(budgets) == 8 and max(budgets) == 64
  assert budgets != [sampling.budget(1, f"id{i}", 256) for i in range(2000)]  # the seed matters
  if kind == "loguniform":
    assert np.median(budgets) < 30  # log-uniform favours small budgets (uniform's median is 36)
  assert ResolutionSampling().budget(0, "x", 256) is None
  assert sampling.budget(0, "x", 20) <= 20  # never above the per-image budget


@pytest.mark.parametrize("text, expected", [
    ("none", TokenDrop()), ("fixed:0.5", TokenDrop("fixed", 0.5)), ("beta:2:5", TokenDrop("beta", 2, 5)),
    ("resolution:0.1:0.6", TokenDrop("resolution", 0.1, 0.6)),
])
def test_token_drop_parses(text, expected):
  assert TokenDrop.parse(text) == expected
  assert str(TokenDrop.parse(text)) == text


@pytest.mark.parametrize("text", ["fixed:1", "fixed:-0.1", "beta:0:1", "resolution:0.2:1.5", "half", "fixed"])
def test_token_drop_rejects_bad_specs(text):
  with pytest.raises(ContractError, match=r"^--token-drop "):
    TokenDrop.parse(text)


def test_fixed_rate_keeps_the_rest_and_at_least_one_token():
  drop = TokenDrop.parse("fixed:0.75")
  assert drop.kept_count(0, "a", 100, 256) == 25
  assert drop.kept_count(0, "a", 1, 256) == 1
  kept = drop.kept_indices(0, "a", 100, 256)
  assert len(kept) == 25 and np.all(np.diff(kept) > 0) and kept.max() < 100  # raster order, no repeats
  assert np.array_equal(kept, drop.kept_indices(0, "a", 100, 256))
  assert not np.array_equal(kept, drop.kept_indices(0, "b", 100, 256))


def test_beta_rates_vary_per_example_with_the_right_mean():
  drop = TokenDrop.parse("beta:2:6")  # mean rate 0.25
  kept = np.array([drop.kept_count(0, f"id{i}", 1000, 1024) for i in range(3000)])
  assert len(set(kept.tolist())) > 100
  assert abs(1 - kept.mean() / 1000 - 0.25) < 0.01
  for i in range(50):
    assert len(drop.kept_indices(0, f"id{i}", 1000, 1024)) == drop.kept_count(0, f"id{i}", 1000, 1024)


def test_resolution_dependent_rate_grows_with_tokens():
  drop = TokenDrop.parse("resolution:0.0:0.5")
  assert drop.kept_count(0, "a", 1, 256) == 1
  assert drop.kept_count(0, "a", 256, 256) == 128
  assert drop.kept_count(0, "a", 128, 256) == round(128 * (1 - 0.5 * 127 / 255))


def test_no_drop_keeps_everything():
  assert TokenDrop().kept_count(0, "a", 77, 256) == 77
  assert np.array_equal(TokenDrop().kept_indices(0, "a", 5, 256), np.arange(5))
