import argparse
import dataclasses

import pytest

from beam_jobs.options import ShardOptions, add_shard_arguments, shard_options_from_args
from schemas.errors import ContractError


def _parser():
  parser = argparse.ArgumentParser()
  add_shard_arguments(parser)
  return parser


def test_every_option_has_a_flag_with_its_default_and_help_and_every_flag_is_an_option():
  parser = _parser()
  fields = {f.name: f for f in dataclasses.fields(ShardOptions)}
  flags = {a.dest: a for a in parser._actions if a.dest != "help"}
  assert set(flags) == set(fields)
  for name, field in fields.items():
    assert flags[name].option_strings == ["--" + name.replace("_", "-")]
    assert flags[name].default == field.default and flags[name].help == field.metadata["help"]
  assert flags["max_patches_per_image"].default is None and flags["max_patches_per_image"].type is int
  assert flags["video"].const is True and flags["video"].nargs == 0  # a store_true flag
  assert shard_options_from_args(parser.parse_args([])) == ShardOptions()


def test_flags_parse_into_options():
  args = _parser().parse_args(["--seq-len", "128", "--max-patches-per-image", "64", "--video", "--video-frames", "5",
                               "--max-error-fraction", "0.2", "--token-drop", "fixed:0.5", "--tokenizer", "m.model"])
  assert shard_options_from_args(args) == ShardOptions(seq_len=128, max_patches_per_image=64, video=True,
                                                       video_frames=5, max_error_fraction=0.2, token_drop="fixed:0.5",
                                                       tokenizer="m.model")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_patches_per_image": 999}, "'max_patches_per_image' (999) must not exceed 'seq_len' (256)"),
    ({"num_shards": 0}, "'num_shards' must be an int >= 1"),
    ({"token_drop": "half"}, "--token-drop 'half'"),
    ({"resolution_sampling": "uniform:1:999"}, "HI (999) must not exceed 'max_patches_per_image' (256)"),
])
def test_bad_options_are_one_line_contract_errors(kwargs, message):
  with pytest.raises(ContractError) as e:
    ShardOptions(**kwargs)
  assert message in str(e.value) and "\n" not in str(e.value)
