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


@pytest.mark.parametrize("kwargs, names", [
    # 4096-pixel patches: 50 MB a token, 12.9 GB a sequence of 256 tokens.
    ({"patch_size": 4096}, ["--patch-size 4096", "--seq-len 256"]),
    ({"seq_len": 200_000, "max_patches_per_image": 64}, ["--seq-len 200000", "--patch-size 16"]),
    ({"max_images": 2_000_000}, ["--max-images 2000000"]),
    ({"text_len": 10_000_000}, ["--text-len 10000000"]),
    ({"seq_len": 1024, "patch_size": 32, "max_record_bytes": 1 << 20}, ["--patch-size 32", "--seq-len 1024"]),
])
def test_a_sequence_over_the_byte_budget_is_refused_naming_the_option_that_blew_it(kwargs, names):
  with pytest.raises(ContractError) as e:
    ShardOptions(**kwargs)
  message = str(e.value)
  assert "--max-record-bytes" in message and "\n" not in message
  for name in names:
    assert name in message
  others = {"--patch-size", "--seq-len", "--max-images", "--text-len"} - {n.split()[0] for n in names}
  assert not [o for o in others if f"{o} " in message]


def test_the_defaults_and_the_repository_configs_fit_the_byte_budget():
  options = ShardOptions()
  assert options.record_bytes_bound() <= options.max_record_bytes
  # The largest sequences the repository builds: action clips (seq_len 512) and a long video sequence.
  ShardOptions(seq_len=512, max_images=4, max_patches_per_image=128, video=True)
  ShardOptions(seq_len=4096, patch_size=32, max_images=64, text_len=1024)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_file_bytes": 0}, "'max_file_bytes' must be an int >= 1"),
    ({"max_record_bytes": 0}, "'max_record_bytes' must be an int >= 1"),
])
def test_byte_limits_are_positive(kwargs, message):
  with pytest.raises(ContractError, match=message):
    ShardOptions(**kwargs)
