import random

import pytest

from beam_jobs.packing import pack_first_fit_decreasing


def _check(items, bins, seq_len, max_images):
  sizes = dict(items)
  packed = [k for b in bins for k in b]
  assert sorted(packed) == sorted(sizes)  # nothing lost, nothing duplicated
  for b in bins:
    assert sum(sizes[k] for k in b) <= seq_len
    assert len(b) <= max_images


@pytest.mark.parametrize("seed", range(20))
def test_random_items_respect_both_limits(seed):
  rng = random.Random(seed)
  items = [(f"id{i}", rng.randint(1, 64)) for i in range(rng.randint(1, 300))]
  bins = pack_first_fit_decreasing(items, 128, 6)
  _check(items, bins, 128, 6)


def test_result_does_not_depend_on_arrival_order():
  rng = random.Random(0)
  items = [(f"id{i}", rng.randint(1, 50)) for i in range(200)]
  shuffled = items[:]
  rng.shuffle(shuffled)
  assert pack_first_fit_decreasing(items, 100, 8) == pack_first_fit_decreasing(shuffled, 100, 8)


def test_first_fit_decreasing_fills_exactly_when_possible():
  bins = pack_first_fit_decreasing([("a", 6), ("b", 4), ("c", 5), ("d", 5)], 10, 4)
  assert bins == [["a", "b"], ["c", "d"]]


def test_image_limit_opens_new_bins():
  bins = pack_first_fit_decreasing([(str(i), 1) for i in range(5)], 100, 2)
  assert [len(b) for b in bins] == [2, 2, 1]


def test_oversized_item_is_an_error():
  with pytest.raises(ValueError, match="'big': 11 tokens"):
    pack_first_fit_decreasing([("big", 11)], 10, 2)
