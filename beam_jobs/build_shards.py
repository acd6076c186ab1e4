"""The shard builder: manifest -> decode -> resize to a patch grid -> patchify -> pack -> TFRecord shards,
with dataset_info.json and errors.jsonl beside them.

Run it as a library (`build_shards(...)`) or through `patchflow shards build`. The default runner is Beam's
in-process FnApiRunner, named explicitly so Beam never tries to download a Prism binary.
"""

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import image_ops
from beam_jobs.packing import pack_first_fit_decreasing
from schemas import dataset_info as info_lib
from schemas.errors import ContractError
from schemas.lineage import write_lineage
from schemas.manifest import iter_manifest_lines, parse_manifest_line
from schemas.packed import FINGERPRINT, SCHEMA_VERSION, PackedSpec


@dataclasses.dataclass(frozen=True)
class ShardOptions:
  seq_len: int = 256
  patch_size: int = 16
  max_images: int = 16
  max_patches_per_image: int = 64
  text_len: int = 0
  num_shards: int = 2
  max_error_fraction: float = 0.01

  def __post_init__(self):
    for name in ("seq_len", "patch_size", "max_images", "max_patches_per_image", "num_shards"):
      if getattr(self, name) < 1:
        raise ContractError(f"shard options: {name!r} must be >= 1, got {getattr(self, name)}")
    if self.max_patches_per_image > self.seq_len:
      raise ContractError(f"shard options: 'max_patches_per_image' ({self.max_patches_per_image}) "
                          f"must not exceed 'seq_len' ({self.seq_len})")
    if not 0 <= self.max_error_fraction <= 1:
      raise ContractError(f"shard options: 'max_error_fraction' must be in [0, 1]")

  @property
  def spec(self) -> PackedSpec:
    return PackedSpec(self.seq_len, self.patch_size, self.max_images, self.text_len)


def _error(line: int, rid: str | None, reason: str, detail: str) -> dict[str, Any]:
  return {"line": line, "id": rid, "reason": reason, "detail": detail}


class ParseRecord(beam.DoFn):
  """(line number, text) -> ManifestRecord, or a tagged error that names the line."""

  def __init__(self, source: str, class_names: tuple[str, ...]):
    self._source, self._class_names = source, class_names

  def process(self, numbered_line):
    line, text = numbered_line
    try:
      yield parse_manifest_line(text, line, self._source, self._class_names)
    except ContractError as e:
      yield beam.pvalue.TaggedOutput("errors", _error(line, None, "invalid_record", str(e)))


def keep_first_of_duplicates(id_and_records):
  """The record with the lowest line number wins; the others become errors."""
  rid, records = id_and_records
  records = sorted(records, key=lambda r: r.line)
  yield records[0]
  for dup in records[1:]:
    yield beam.pvalue.TaggedOutput(
        "errors", _error(dup.line, rid, "duplicate_id", f"id {rid!r} first seen on line {records[0].line}"))


class DecodeAndPatchify(beam.DoFn):
  """ManifestRecord -> patchified example dict, or a tagged error (missing or unreadable image)."""

  def __init__(self, base_dir: str, options: ShardOptions):
    self._base_dir, self._options = base_dir, options

  def process(self, record):
    opts = self._options
    if record.image is None:
      yield beam.pvalue.TaggedOutput(
          "errors", _error(record.line, record.id, "unsupported", "video records need the video shard builder"))
      return
    path = record.image if os.path.isabs(record.image) or "://" in record.image else os.path.join(
        self._base_dir, record.image)
    try:
      with beam.io.filesystems.FileSystems.open(path) as f:
        data = f.read()
    except Exception as e:  # noqa: BLE001 - any IO failure is this record's error, never the job's.
      yield beam.pvalue.TaggedOutput(
          "errors", _error(record.line, record.id, "missing_image", f"cannot read {path}: {e}".splitlines()[0]))
      return
    try:
      pixels = image_ops.decode_rgb(data)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files.
      yield beam.pvalue.TaggedOutput(
          "errors", _error(record.line, record.id, "undecodable_image", f"{path}: {type(e).__name__}: {e}"))
      return
    rows, cols = image_ops.fit_patch_grid(pixels.shape[0], pixels.shape[1], opts.patch_size,
                                          opts.max_patches_per_image)
    resized = image_ops.resize_to_grid(pixels, rows, cols, opts.patch_size)
    patches, yx = image_ops.patchify(resized, opts.patch_size)
    tokens = image_ops.byte_tokens(record.text or "")[:opts.text_len] if opts.text_len else None
    yield {"id": record.id, "label": record.label, "split": record.split, "patches": patches, "yx": yx,
           "grid": (rows, cols), "text_tokens": tokens, "source_size": pixels.shape[:2]}


def assemble_sequence(examples: list[dict[str, Any]], spec: PackedSpec) -> dict[str, np.ndarray]:
  """Lays out the examples of one bin into one fixed-shape packed example (segment m = slot m-1)."""
  out = spec.empty()
  pos, text_pos = 0, 0
  for slot, ex in enumerate(examples):
    n = len(ex["patches"])
    out["patches"][pos:pos + n] = ex["patches"]
    out["patch_yx"][pos:pos + n] = ex["yx"]
    out["segment_ids"][pos:pos + n] = slot + 1
    out["image_grid"][slot] = ex["grid"]
    out["labels"][slot] = ex["label"]
    out["example_ids"][slot] = ex["id"].encode("utf-8")
    if spec.text_len and ex["text_tokens"] is not None:
      tokens = ex["text_tokens"][:spec.text_len - text_pos]
      out["text_tokens"][text_pos:text_pos + len(tokens)] = tokens
      out["text_segment_ids"][text_pos:text_pos + len(tokens)] = slot + 1
      text_pos += len(tokens)
    pos += n
  return out


def pack_split(split_and_examples, options: ShardOptions):
  """All examples of one split -> ((split, shard index), (sequence index, serialized example))."""
  split, examples = split_and_examples
  by_id = {ex["id"]: ex for ex in examples}
  bins = pack_first_fit_decreasing([(rid, len(ex["patches"])) for rid, ex in by_id.items()],
                                   options.seq_len, options.max_images)
  num_shards = min(options.num_shards, len(bins))
  for index, keys in enumerate(bins):
    sequence = assemble_sequence([by_id[k] for k in keys], options.spec)
    stats = {"images": len(keys), "tokens": int((sequence["segment_ids"] > 0).sum())}
    yield (split, index % num_shards, num_shards), (index, options.spec.to_tf_example_bytes(sequence), stats)


def write_shard(key_and_sequences, output_dir: str) -> dict[str, Any]:
  """Writes one shard file once, sequences in index order, under a temporary name then renamed."""
  import tensorflow as tf
  (split, shard, num_shards), sequences = key_and_sequences
  sequences = sorted(sequences, key=lambda s: s[0])
  rel = f"{split}/shard-{shard:05d}-of-{num_shards:05d}.tfrecord"
  path = os.path.join(output_dir, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.TFRecordWriter(tmp) as writer:
    for _, record, _ in sequences:
      writer.write(record)
  with open(tmp, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  os.replace(tmp, path)
  return {"path": rel, "split": split, "sha256": digest, "num_sequences": len(sequences),
          "num_images": sum(s[2]["images"] for s in sequences), "num_tokens": sum(s[2]["tokens"] for s in sequences)}


def summarize(shards: list[dict[str, Any]], errors: list[dict[str, Any]], num_lines: int, options: ShardOptions,
              num_classes: int, class_names: tuple[str, ...]) -> dict[str, Any]:
  shards = sorted(shards, key=lambda s: s["path"])
  splits: dict[str, dict[str, Any]] = {}
  for s in shards:
    acc = splits.setdefault(s["split"], {"num_examples": 0, "num_sequences": 0, "num_tokens": 0})
    acc["num_examples"] += s["num_images"]
    acc["num_sequences"] += s["num_sequences"]
    acc["num_tokens"] += s["num_tokens"]
  num_sequences = sum(s["num_sequences"] for s in shards)
  real_tokens = sum(s["num_tokens"] for s in shards)
  errors_by_reason: dict[str, int] = {}
  for e in errors:
    errors_by_reason[e["reason"]] = errors_by_reason.get(e["reason"], 0) + 1
  return {
      "schema_version": SCHEMA_VERSION, "fingerprint": FINGERPRINT,
      "seq_len": options.seq_len, "patch_size": options.patch_size, "max_images": options.max_images,
      "text_len": options.text_len, "max_patches_per_image": options.max_patches_per_image,
      "num_classes": num_classes, "class_names": list(class_names),
      "num_examples": sum(s["num_examples"] for s in splits.values()), "num_sequences": num_sequences,
      "num_manifest_lines": num_lines, "num_errors": len(errors), "errors_by_reason": errors_by_reason,
      "packing_efficiency": real_tokens / max(1, num_sequences * options.seq_len), "tokens_dropped": 0,
      "splits": dict(sorted(splits.items())), "shards": shards, "options": dataclasses.asdict(options),
  }


class BuildShards(beam.PTransform):
  """(line number, manifest line) pairs -> shard files; emits a dict with `shards` and `errors` lists."""

  def __init__(self, source: str, base_dir: str, output_dir: str, options: ShardOptions,
               class_names: tuple[str, ...]):
    super().__init__()
    self._source, self._base_dir, self._output_dir = source, base_dir, output_dir
    self._options, self._class_names = options, class_names

  def expand(self, numbered_lines):
    parsed = numbered_lines | "Parse" >> beam.ParDo(ParseRecord(self._source, self._class_names)).with_outputs(
        "errors", main="records")
    unique = (parsed.records
              | "KeyById" >> beam.Map(lambda r: (r.id, r))
              | "GroupById" >> beam.GroupByKey()
              | "FirstOfDuplicates" >> beam.FlatMap(keep_first_of_duplicates).with_outputs("errors", main="records"))
    decoded = unique.records | "DecodeAndPatchify" >> beam.ParDo(
        DecodeAndPatchify(self._base_dir, self._options)).with_outputs("errors", main="examples")
    shards = (decoded.examples
              | "KeyBySplit" >> beam.Map(lambda ex: (ex["split"], ex))
              | "GroupBySplit" >> beam.GroupByKey()
              | "Pack" >> beam.FlatMap(pack_split, self._options)
              | "GroupByShard" >> beam.GroupByKey()
              | "WriteShard" >> beam.Map(write_shard, self._output_dir))
    errors = (parsed.errors, unique.errors, decoded.errors) | "AllErrors" >> beam.Flatten()
    return {"shards": shards, "errors": errors}


def _write_json_lines(path: str, rows: Iterable[dict[str, Any]]) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True) + "\n")
  os.replace(path + ".tmp", path)


def _read_class_names(manifest: str) -> tuple[str, ...]:
  path = os.path.join(os.path.dirname(manifest), "classes.json")
  if not os.path.exists(path):
    return ()
  with open(path, encoding="utf-8") as f:
    return tuple(json.load(f)["class_names"])


def build_shards(manifest: str, output_dir: str, options: ShardOptions = ShardOptions(),
                 beam_args: list[str] | None = None) -> dict[str, Any]:
  """Runs the whole job; returns dataset_info. Raises ContractError when too many records are bad."""
  if not os.path.exists(manifest):
    raise ContractError(f"manifest {manifest!r}: file not found")
  lines = list(iter_manifest_lines(manifest))
  if not lines:
    raise ContractError(f"manifest {manifest!r}: no records")
  class_names = _read_class_names(manifest)
  os.makedirs(output_dir, exist_ok=True)
  num_classes = len(class_names) or 1 + max(
      (label for label in (_int_label(t) for _, t in lines) if label is not None), default=0)
  pipeline_options = PipelineOptions(beam_args or [])
  runner = None
  if not pipeline_options.get_all_options().get("runner"):
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    runner = FnApiRunner()  # in-process; naming it keeps Beam from fetching a Prism binary.
  with beam.Pipeline(runner=runner, options=pipeline_options) as p:
    outputs = p | "ManifestLines" >> beam.Create(lines) | "BuildShards" >> BuildShards(
        manifest, os.path.dirname(manifest), output_dir, options, class_names)
    shards = outputs["shards"] | "AllShards" >> beam.combiners.ToList()
    errors = outputs["errors"] | "AllErrors" >> beam.combiners.ToList()
    _ = (p | "Once" >> beam.Create([None])
         | "WriteInfo" >> beam.Map(_write_info, beam.pvalue.AsSingleton(shards), beam.pvalue.AsSingleton(errors),
                                   output_dir, len(lines), options, num_classes, class_names))
  info = info_lib.read_dataset_info(output_dir)
  write_lineage(output_dir, "build_shards", dataclasses.asdict(options), {"manifest": manifest})
  if info["num_errors"] > options.max_error_fraction * len(lines):
    with open(os.path.join(output_dir, info_lib.ERRORS_FILENAME), encoding="utf-8") as f:
      first = json.loads(f.readline())
    raise ContractError(
        f"{info['num_errors']} of {len(lines)} manifest records failed (max_error_fraction "
        f"{options.max_error_fraction}); first: {manifest}:{first['line']}: {first['detail']} "
        f"(all in {os.path.join(output_dir, info_lib.ERRORS_FILENAME)})")
  print(f"build_shards: {info['num_examples']} images -> {info['num_sequences']} sequences in "
        f"{len(info['shards'])} shards, packing efficiency {info['packing_efficiency']:.3f}, "
        f"{info['num_errors']} errors", file=sys.stderr)
  return info


def _write_info(_, shards, errors, output_dir, num_lines, options, num_classes, class_names):
  errors = sorted(errors, key=lambda e: (e["line"], e["reason"]))
  info = summarize(shards, errors, num_lines, options, num_classes, class_names)
  _write_json_lines(os.path.join(output_dir, info_lib.ERRORS_FILENAME), errors)
  path = os.path.join(output_dir, info_lib.FILENAME)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(info, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def _int_label(text: str) -> int | None:
  try:
    label = json.loads(text).get("label")
  except (json.JSONDecodeError, AttributeError):
    return None
  return label if isinstance(label, int) and not isinstance(label, bool) else None
