"""The shard builder's options, each field with its command-line help, and the `patchflow shards build` flags
generated from them (one flag per field, so the two cannot drift apart).

Every `patchflow` command builds the `shards build` parser, so this module imports nothing heavy at load time:
the NaViT option parsers and the packed spec (numpy) are imported where options are checked or used.
"""

import argparse
import dataclasses
import functools
import typing
from typing import Any

from schemas.errors import ContractError

if typing.TYPE_CHECKING:
  from beam_jobs.navit import ResolutionSampling, TokenDrop
  from schemas.packed import PackedSpec


def _option(default, help: str, **flag):  # noqa: A002 - argparse's name for it
  """A field whose metadata is its flag's help (and any other argparse keyword, e.g. metavar)."""
  return dataclasses.field(default=default, metadata={"help": help, **flag})


@dataclasses.dataclass(frozen=True)
class ShardOptions:
  """Everything that decides the bytes of the shards (worker count and runner do not)."""
  seq_len: int = _option(256, "tokens per packed sequence (L)")
  patch_size: int = _option(16, "patch side in pixels (P)")
  max_images: int = _option(16, "images per packed sequence at most (M)")
  max_patches_per_image: int | None = _option(None, "per-image patch budget (default: L)")
  text_len: int = _option(0, "caption tokens per sequence (byte-level unless --tokenizer; 0: no text)")
  num_shards: int = _option(2, "shards per split (fewer for a tiny split)")
  max_error_fraction: float = _option(
      0.01, "fail (after writing errors.jsonl) when more than this fraction of records is bad")
  seed: int = _option(0, "seed of resolution sampling and token dropping")
  resolution_sampling: str = _option(
      "none", "none | uniform:LO:HI | loguniform:LO:HI (patch budget per example)", metavar="SPEC")
  token_drop: str = _option("none", "none | fixed:RATE | beta:A:B | resolution:LO:HI", metavar="SPEC")
  video: bool = _option(False, "pack video records (lists of frame images or video files): adds patch_t, boxes "
                               "and the tubelet fields")
  video_frames: int = _option(8, "frames sampled from a video file, evenly by frame index (all when it has fewer)")
  window_size: int = _option(65536, "examples per packing window")
  tokenizer: str = _option("", "SentencePiece model file for text tokens (default: byte-level)", metavar="MODEL")
  max_file_bytes: int = _option(256 << 20, "largest image or video file read, in bytes; a larger one, or anything "
                                           "but a regular file, is an error row", metavar="BYTES")
  max_record_bytes: int = _option(64 << 20, "byte budget of one packed sequence; options that plan larger ones "
                                            "are refused before anything is written", metavar="BYTES")

  def __post_init__(self):
    from beam_jobs.navit import ResolutionSampling, TokenDrop
    if self.max_patches_per_image is None:
      object.__setattr__(self, "max_patches_per_image", self.seq_len)
    for name in ("seq_len", "patch_size", "max_images", "max_patches_per_image", "num_shards", "window_size",
                 "video_frames", "max_file_bytes", "max_record_bytes"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ContractError(f"shard options: {name!r} must be an int >= 1, got {getattr(self, name)!r}")
    if self.max_patches_per_image > self.seq_len:
      raise ContractError(f"shard options: 'max_patches_per_image' ({self.max_patches_per_image}) "
                          f"must not exceed 'seq_len' ({self.seq_len})")
    if self.text_len < 0:
      raise ContractError(f"shard options: 'text_len' must be >= 0, got {self.text_len}")
    if not 0 <= self.max_error_fraction <= 1:
      raise ContractError(f"shard options: 'max_error_fraction' must be in [0, 1], got {self.max_error_fraction}")
    sampling = ResolutionSampling.parse(self.resolution_sampling)
    if sampling.high > self.max_patches_per_image:
      raise ContractError(f"--resolution-sampling {self.resolution_sampling!r}: HI ({sampling.high}) must not "
                          f"exceed 'max_patches_per_image' ({self.max_patches_per_image})")
    TokenDrop.parse(self.token_drop)
    self._check_record_budget()

  def record_parts(self) -> dict[str, int]:
    """Upper bounds of a packed sequence's bytes by what sizes them: per token the patch plus up to 32 bytes of
    per-token fields, 20 per text token, 64 per image slot (per-slot fields; ids beyond that are not counted),
    4 KiB of framing and field names."""
    return {"tokens": self.seq_len * (self.patch_size * self.patch_size * 3 + 32), "text": self.text_len * 20,
            "slots": self.max_images * 64, "framing": 4096}

  def record_bytes_bound(self) -> int:
    """About the most bytes one framed packed example takes; it sizes the disk reserved for a shard and is
    checked against `max_record_bytes`."""
    return sum(self.record_parts().values())

  def _check_record_budget(self) -> None:
    """Refuses options whose sequences would not fit `max_record_bytes`, before any file is read or written,
    naming the options behind the largest part (4096-pixel patches make every token 50 MB)."""
    parts, total = self.record_parts(), self.record_bytes_bound()
    if total <= self.max_record_bytes:
      return
    largest = max(("tokens", "text", "slots"), key=parts.get)
    why = {"tokens": f"--seq-len {self.seq_len} tokens x {parts['tokens'] // self.seq_len} bytes a token "
                     f"(--patch-size {self.patch_size}: {self.patch_size}x{self.patch_size}x3 bytes a patch); "
                     f"lower --patch-size or --seq-len",
           "text": f"--text-len {self.text_len} text tokens x 20 bytes; lower --text-len",
           "slots": f"--max-images {self.max_images} slots x 64 bytes; lower --max-images"}[largest]
    raise ContractError(f"shard options: a packed sequence would take up to {total} bytes, over "
                        f"--max-record-bytes {self.max_record_bytes}: {why}")
  @functools.cached_property
  def sampling(self) -> "ResolutionSampling":
    from beam_jobs.navit import ResolutionSampling
    return ResolutionSampling.parse(self.resolution_sampling)

  @functools.cached_property
  def dropping(self) -> "TokenDrop":
    from beam_jobs.navit import TokenDrop
    return TokenDrop.parse(self.token_drop)

  @property
  def spec(self) -> "PackedSpec":
    from schemas.packed import PackedSpec
    return PackedSpec(self.seq_len, self.patch_size, self.max_images, self.text_len, self.video)

  def to_json(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _flag_type(annotation) -> type:
  """int for `int | None`, else the annotation itself."""
  return next((t for t in typing.get_args(annotation) if t is not type(None)), annotation)


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
  """A `--field-name` flag per ShardOptions field, with its type, default and help; a bool is a store_true flag."""
  for field in dataclasses.fields(ShardOptions):
    flag = "--" + field.name.replace("_", "-")
    if field.type is bool:
      parser.add_argument(flag, action="store_true", **field.metadata)
    else:
      parser.add_argument(flag, type=_flag_type(field.type), default=field.default, **field.metadata)


def shard_options_from_args(args: argparse.Namespace) -> ShardOptions:
  return ShardOptions(**{field.name: getattr(args, field.name) for field in dataclasses.fields(ShardOptions)})
