"""Sources of the shard builder. Each one is a PTransform from the pipeline root to
{"examples": SourceExample, "errors": error row}, where every source record (a manifest line, a synthetic
example, a TFDS record) yields exactly one of the two, numbered from 1 in source order ("line").

  PATH                              a manifest JSONL, local or gs://
  synthetic[:seed=S,train=N,...]    the spine's synthetic shapes, rendered inside the job
  tfds:NAME[/CONFIG][:VERSION]      a TFDS dataset already prepared in a data_dir (TFRecord file format)

All three give the same ManifestRecord; an inline source (synthetic, TFDS) carries the encoded image bytes with
it, a manifest record points at files that the job reads through Beam's FileSystems.
"""

import dataclasses
import json
import os
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_jobs import synthetic
from schemas import tfrecord
from schemas.errors import ContractError
from schemas.manifest import ManifestRecord, load_json_line, parse_manifest_line, split_name_problem

MANIFEST_CHUNK_BYTES = 4 << 20  # ~30,000 lines: the unit of parallelism of reading and planning


@dataclasses.dataclass(frozen=True)
class SourceExample:
  record: ManifestRecord
  locations: tuple[str, ...]  # resolved path of the image, or of each video frame
  data: tuple[bytes, ...] | None = None  # inline encoded bytes, one per location; None: read the locations


def error_row(line: int, rid: str | None, reason: str, detail: str) -> dict[str, Any]:
  """An error row; an id or detail holding lone surrogates (JSON's \\ud800 escapes) gets them as backslash
  escapes, since the row must itself be valid UTF-8 (Beam's coders and errors.jsonl encode it)."""
  return {"line": line, "id": None if rid is None else _printable(rid), "reason": reason,
          "detail": _printable(detail)}


def _printable(text: str) -> str:
  return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_remote(path: str) -> bool:
  return "://" in path


def resolve(base_dir: str, path: str) -> str:
  """A manifest path relative to the manifest's own directory, unless absolute or a URI."""
  if is_remote(path) or path.startswith("/") or not base_dir:
    return path
  return FileSystems.join(base_dir, path)


# ---------------------------------------------------------------------------------------------------- manifest

def parse_numbered_line(line: int, text: str, source: str, base_dir: str,
                        class_names: tuple[str, ...]) -> SourceExample | dict[str, Any]:
  """One manifest line -> SourceExample, or an error row: not_json, no_image or invalid_record."""
  try:
    obj = load_json_line(text, f"{source}:{line}")
  except ContractError as e:
    return error_row(line, None, "not_json", str(e))
  rid = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
  if isinstance(obj, dict) and obj.get("image") is None and obj.get("video") is None:
    return error_row(line, rid, "no_image", f"{source}:{line}: record has neither 'image' nor 'video'")
  try:
    record = parse_manifest_line(text, line, source, class_names)
  except ContractError as e:
    return error_row(line, rid, "invalid_record", str(e))
  if record.image is not None:
    locations = (resolve(base_dir, record.image),)
  elif isinstance(record.video, tuple):
    locations = tuple(resolve(base_dir, f) for f in record.video)
  else:
    locations = (resolve(base_dir, record.video),)
  return SourceExample(record, locations)


def manifest_chunks(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
  """Byte ranges [start, end) covering a file of `size` bytes; a line belongs to the chunk it starts in."""
  chunk_bytes = max(1, chunk_bytes)
  return [(start, min(size, start + chunk_bytes)) for start in range(0, max(size, 1), chunk_bytes)]


def count_newlines(path: str, chunk: tuple[int, int]) -> tuple[int, int]:
  """(chunk start, number of b'\\n' in [start, end))."""
  start, end = chunk
  count = 0
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.seek(start)
    remaining = end - start
    while remaining > 0:
      block = f.read(min(remaining, 1 << 20))
      if not block:
        break
      count += block.count(b"\n")
      remaining -= len(block)
  return start, count


def read_chunk_lines(chunk: tuple[int, int], path: str, newline_counts: list[tuple[int, int]]):
  """(line number, text) of every non-blank line that starts in the chunk. Line n starts after the
  (n-1)-th newline of the file, so the newlines counted in the chunks before this one (`newline_counts`:
  count_newlines of every chunk) give its first line number."""
  start, end = chunk
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    number = sum(count for chunk_start, count in newline_counts if chunk_start < start) + 1
    pos = start
    if start > 0:
      f.seek(start - 1)
      if f.read(1) != b"\n":  # the chunk starts inside a line that belongs to the previous chunk.
        pos += len(f.readline())
        number += 1
    else:
      f.seek(0)
    while pos < end:
      raw = f.readline()
      if not raw:
        break
      pos += len(raw)
      text = raw.decode("utf-8", errors="replace")
      if text.strip():
        yield number, text
      number += 1


class ReadNumberedLines(beam.PTransform):
  """A splittable read of a text file that keeps 1-based line numbers: the file is cut into byte ranges, a
  first pass counts newlines per range (cheap, parallel), a second reads each range starting from the line
  number those counts give. A compressed (.gz, ...) file cannot be cut and is read as one range."""

  def __init__(self, path: str, chunk_bytes: int = MANIFEST_CHUNK_BYTES):
    super().__init__()
    self._path, self._chunk_bytes = path, chunk_bytes

  def expand(self, pbegin):
    path = self._path
    (meta,) = FileSystems.match([path])[0].metadata_list
    compressed = CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED
    if compressed:
      return (pbegin | "OneFile" >> beam.Create([path])
              | "ReadAll" >> beam.FlatMap(_read_compressed_lines))
    # Create redistributes several chunks itself, and the counts reach the reads as a plain list side input:
    # a Reshuffle or a combine here would add 5 or 10 transforms to the start-up of every run (~0.1 s locally).
    chunks = pbegin | "Chunks" >> beam.Create(manifest_chunks(meta.size_in_bytes, self._chunk_bytes))
    counts = chunks | "CountNewlines" >> beam.Map(lambda c: count_newlines(path, c))
    return chunks | "ReadChunk" >> beam.FlatMap(read_chunk_lines, path, beam.pvalue.AsList(counts))


def _read_compressed_lines(path: str):
  with FileSystems.open(path) as f:
    for number, raw in enumerate(f, start=1):
      text = raw.decode("utf-8", errors="replace")
      if text.strip():
        yield number, text


def _split_parsed(numbered, source, base_dir, class_names):
  parsed = parse_numbered_line(numbered[0], numbered[1], source, base_dir, class_names)
  if isinstance(parsed, dict):
    yield beam.pvalue.TaggedOutput("errors", parsed)
  else:
    yield parsed


class ManifestSource(beam.PTransform):
  def __init__(self, path: str, class_names: tuple[str, ...] = (), chunk_bytes: int = MANIFEST_CHUNK_BYTES):
    super().__init__()
    self._path, self._class_names, self._chunk_bytes = path, class_names, chunk_bytes

  def expand(self, pbegin):
    base_dir = FileSystems.split(self._path)[0]
    parsed = (pbegin | "Lines" >> ReadNumberedLines(self._path, self._chunk_bytes)
              | "Parse" >> beam.FlatMap(_split_parsed, self._path, base_dir, self._class_names).with_outputs(
                  "errors", main="examples"))
    return {"examples": parsed.examples, "errors": parsed.errors}


def read_class_names(manifest: str) -> tuple[str, ...]:
  """classes.json ({"class_names": [...]}) beside the manifest names the classes, when present."""
  path = FileSystems.join(FileSystems.split(manifest)[0], "classes.json")
  if not FileSystems.exists(path):
    return ()
  with FileSystems.open(path) as f:
    try:
      names = json.loads(f.read().decode("utf-8"))["class_names"]
    except (ValueError, KeyError, TypeError):
      raise ContractError(f"{path}: expected {{\"class_names\": [...]}}") from None
  return tuple(names)


# --------------------------------------------------------------------------------------------------- synthetic

def parse_synthetic_spec(spec: str) -> dict[str, Any]:
  """`synthetic[:seed=S,train=N,val=N,test=N,noise=1+2+3]` -> generate_synthetic's arguments."""
  _, _, rest = spec.partition(":")
  seed, splits, noise = 0, dict(synthetic.DEFAULT_SPLITS), synthetic.DEFAULT_NOISE_LEVELS
  for part in filter(None, rest.split(",")):
    key, _, value = part.partition("=")
    if key not in ("seed", "noise") and split_name_problem(key):
      raise ContractError(f"source {spec!r}: bad part {part!r}: a split name {split_name_problem(key)}")
    try:
      if key == "seed":
        seed = int(value)
      elif key == "noise":
        noise = tuple(int(v) for v in value.split("+") if v)
      else:
        splits[key] = int(value)
    except ValueError:
      raise ContractError(f"source {spec!r}: bad part {part!r} (expected seed=S, SPLIT=N or noise=1+2)") from None
  return {"seed": seed, "splits": {k: v for k, v in splits.items() if v > 0}, "noise_levels": noise}


def _render_synthetic(numbered_task):
  line, task = numbered_task
  record, png = synthetic.render_example(task)
  parsed = parse_manifest_line(json.dumps(record, sort_keys=True), line, "synthetic", synthetic.CLASS_NAMES)
  return SourceExample(parsed, (f"synthetic:{record['image']}",), (png,))


class SyntheticSource(beam.PTransform):
  def __init__(self, seed: int = 0, splits: dict[str, int] | None = None,
               noise_levels: tuple[int, ...] = synthetic.DEFAULT_NOISE_LEVELS):
    super().__init__()
    self._tasks = synthetic.example_tasks(seed, splits, noise_levels)

  def expand(self, pbegin):
    examples = (pbegin | "Tasks" >> beam.Create(list(enumerate(self._tasks, start=1)))
                | "Spread" >> beam.Reshuffle()
                | "Render" >> beam.Map(_render_synthetic))
    errors = pbegin | "NoErrors" >> beam.Create([])
    return {"examples": examples, "errors": errors}


# -------------------------------------------------------------------------------------------------------- tfds

@dataclasses.dataclass(frozen=True)
class TfdsPlan:
  """What the job needs of a prepared TFDS dataset, resolved once in the driver (plain, picklable)."""
  name: str
  files: tuple[tuple[str, str, int], ...]  # (split, TFRecord path, line number of its first record)
  image_key: str
  label_key: str | None
  text_key: str | None
  class_names: tuple[str, ...]
  num_records: int


def plan_tfds(spec: str, data_dir: str | None) -> TfdsPlan:
  """`tfds:NAME[/CONFIG][:VERSION]` -> TfdsPlan; the dataset must already be prepared in data_dir."""
  import tensorflow_datasets as tfds
  name = spec.partition(":")[2]
  if not name:
    raise ContractError(f"source {spec!r}: expected tfds:NAME[/CONFIG][:VERSION]")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    info = builder.info
    splits = info.splits
    if not splits:
      raise ValueError("no prepared splits")
  except Exception as e:  # noqa: BLE001 - TFDS raises many types for a missing dataset.
    raise ContractError(f"source {spec!r}: not prepared in data_dir {data_dir!r} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  if "tfrecord" not in str(info.file_format).lower():
    raise ContractError(f"source {spec!r}: file format {info.file_format} is not supported (TFRecord only)")
  features = info.features

  def first_of(kind: str, preferred: tuple[str, ...]) -> str | None:
    keys = [k for k, f in features.items() if type(f).__name__ == kind]
    return next((k for k in preferred if k in keys), keys[0] if keys else None)

  image_key = first_of("Image", ("image",))
  if image_key is None:
    raise ContractError(f"source {spec!r}: the dataset has no top-level Image feature")
  label_key = first_of("ClassLabel", ("label",))
  text_key = first_of("Text", ("caption", "text", "question"))
  class_names = tuple(features[label_key].names) if label_key else ()
  files, line = [], 1
  for split in sorted(splits.keys()):
    if split_name_problem(split.replace("/", "_")):
      raise ContractError(f"source {spec!r}: split {split!r}: a split name {split_name_problem(split)}")
    info_split = splits[split]
    for path, length in zip(info_split.filepaths, info_split.shard_lengths):
      files.append((split, str(path), line))
      line += int(length)
  return TfdsPlan(info.full_name, tuple(files), image_key, label_key, text_key, class_names, line - 1)


def tfds_record(plan: TfdsPlan, split: str, line: int, serialized: bytes) -> SourceExample | dict[str, Any]:
  """One serialized TFDS example -> SourceExample with the encoded image inline, or an error row."""
  rid = f"{plan.name}:{split}:{line}"
  try:
    features = tfrecord.decode_example(serialized)
  except ValueError as e:
    return error_row(line, rid, "invalid_record", f"tfds {plan.name} {split} record {line}: {e}")
  image = features.get(plan.image_key, ("bytes", []))[1]
  if not image or not image[0]:
    return error_row(line, rid, "no_image", f"tfds {plan.name} {split} record {line}: no {plan.image_key!r}")
  label = 0
  if plan.label_key and features.get(plan.label_key, ("int64", []))[1]:
    label = int(features[plan.label_key][1][0])
  text = None
  if plan.text_key and features.get(plan.text_key, ("bytes", []))[1]:
    text = features[plan.text_key][1][0].decode("utf-8", errors="replace")
  record = ManifestRecord(id=rid, label=max(label, 0), image=f"tfds:{plan.name}/{split}/{line}", text=text,
                          split=split.replace("/", "_"), line=line)
  return SourceExample(record, (record.image,), (image[0],))


def _read_tfds_file(file, plan: TfdsPlan):
  split, path, first_line = file
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    for offset, serialized in enumerate(tfrecord.read_records(f, path)):
      parsed = tfds_record(plan, split, first_line + offset, serialized)
      if isinstance(parsed, dict):
        yield beam.pvalue.TaggedOutput("errors", parsed)
      else:
        yield parsed


class TfdsSource(beam.PTransform):
  def __init__(self, plan: TfdsPlan):
    super().__init__()
    self._plan = plan

  def expand(self, pbegin):
    read = (pbegin | "Files" >> beam.Create(list(self._plan.files))
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(_read_tfds_file, self._plan).with_outputs("errors", main="examples"))
    return {"examples": read.examples, "errors": read.errors}


# ------------------------------------------------------------------------------------------------------- resolve

@dataclasses.dataclass
class ResolvedSource:
  description: str
  transform: beam.PTransform
  class_names: tuple[str, ...]
  manifest_path: str | None = None  # for lineage


def resolve_source(spec: str, tfds_data_dir: str | None = None,
                   chunk_bytes: int = MANIFEST_CHUNK_BYTES) -> ResolvedSource:
  if spec == "synthetic" or spec.startswith("synthetic:"):
    args = parse_synthetic_spec(spec)
    return ResolvedSource(spec, SyntheticSource(**args), tuple(synthetic.CLASS_NAMES))
  if spec.startswith("tfds:"):
    plan = plan_tfds(spec, tfds_data_dir)
    return ResolvedSource(spec, TfdsSource(plan), plan.class_names)
  if not FileSystems.exists(spec):
    raise ContractError(f"manifest {spec!r}: file not found")
  if "://" not in spec and os.path.isdir(spec):
    raise ContractError(f"manifest {spec!r}: a directory, not a JSONL file")
  if "://" not in spec and not os.path.isfile(spec):  # a FIFO would block the job's first read
    raise ContractError(f"manifest {spec!r}: not a regular file")
  class_names = read_class_names(spec)
  return ResolvedSource(spec, ManifestSource(spec, class_names, chunk_bytes), class_names, spec)
