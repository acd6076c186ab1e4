"""The shard builder: source records -> plan (image size, patch grid, tokens) -> pack -> decode, patchify and
write deterministic TFRecord shards, with dataset_info.json and errors.jsonl beside them.

  source ──► Plan ──► windows ──► PackWindow ─────────┬──► (split, shard) ──► WriteShard ──► WriteInfo
  (manifest/  (reads    (hash of   first line of an id │      ▲
   synthetic/  headers,  the id)    wins; best-fit      └► tail pool ─► PackTail
   tfds)       checks               decreasing
               files
               whole)

Only metadata travels through the shuffles: the pixels are decoded once, by the worker that writes the shard,
so the job's memory and shuffle volume do not grow with image size. Run it as a library (`build_shards(...)`)
or through `patchflow shards build`. The default runner is Beam's in-process FnApiRunner, named explicitly so
Beam never tries to download a Prism binary; `workers` > 1 runs it with that many worker threads (or processes
with `--direct_running_mode=multi_processing` among the Beam args). Every read
and write goes through Beam's FileSystems, so inputs and outputs may be local paths or gs:// URIs.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import hashlib
import itertools
import json
import math
import pickle
import re
import sys
import threading
import time
import uuid
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, TypeOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from PIL import UnidentifiedImageError

from beam_jobs import image_ops, packing, shard_file
from beam_jobs import video as video_lib
from beam_jobs import text as text_lib
from beam_jobs.options import ShardOptions
from beam_jobs.sources import SourceExample, error_row, resolve_source
from schemas import dataset_info as info_lib
from schemas import tfrecord
from schemas.errors import ContractError
from schemas.lineage import LINEAGE_FILENAME, fingerprint_path, git_revision
from schemas.packed import FINGERPRINT, SCHEMA_VERSION, PackedSpec

NAMESPACE = "build_shards"
REMOTE_READ_THREADS = 16
PLAN_BATCH = 1024  # plans per element after planning
ERROR_REASONS = ("not_json", "invalid_record", "no_image", "duplicate_id", "missing_file", "unreadable_file",
                 "empty_file", "not_an_image", "truncated_image", "undecodable_image", "unsupported_video",
                 "undecodable_video", "too_many_frames")


class ExampleError(Exception):
  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason, self.detail = reason, detail


class _Progress:
  """A progress line on stderr at most every `every` seconds, per worker process (local runs show them)."""

  def __init__(self, what: str, every: float = 10.0):
    self._what, self._every = what, every
    self._count, self._start, self._last = 0, None, 0.0

  def add(self, n: int = 1) -> None:
    now = time.monotonic()
    if self._start is None:
      self._start = self._last = now
    self._count += n
    if now - self._last >= self._every:
      self._last = now
      rate = self._count / max(1e-9, now - self._start)
      print(f"build_shards: {self._count} {self._what} in this worker ({rate:.0f}/s)", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ planning

@dataclasses.dataclass(frozen=True)
class Planned:
  """An example with its patch grid and token count decided, before any pixel is decoded."""
  example: SourceExample
  rows: int
  cols: int
  frames: int
  tokens: int  # after token dropping
  source_frames: int = 0  # frames of a video file (`frames` of them are sampled); 0 for images and frame lists

  @property
  def id(self) -> str:
    return self.example.record.id

  @property
  def split(self) -> str:
    return self.example.record.split

  @property
  def line(self) -> int:
    return self.example.record.line


_FILESYSTEMS: dict[str | None, Any] = {}


def _filesystem(path: str):
  """FileSystems.get_filesystem, cached per scheme: the lookup walks every FileSystem subclass on each call,
  which costs more than reading a small local file."""
  scheme = FileSystems.get_scheme(path)
  if scheme not in _FILESYSTEMS:
    _FILESYSTEMS[scheme] = FileSystems.get_filesystem(path)
  return _FILESYSTEMS[scheme]


def read_location(example: SourceExample, index: int) -> bytes:
  """The encoded bytes of the example's image (or frame `index`), inline or read through FileSystems."""
  if example.data is not None:
    data = example.data[index]
  else:
    path = example.locations[index]
    try:
      if not is_local(path):
        with _filesystem(path).open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
          data = f.read()
      else:  # unbuffered: one read sized by fstat (Beam's local open adds a buffered reader and a codec probe)
        with open(path, "rb", buffering=0) as f:
          data = f.readall()
    except Exception as e:  # noqa: BLE001 - any IO failure is this record's error, never the job's.
      try:
        exists = FileSystems.exists(path)
      except Exception:  # noqa: BLE001
        exists = True
      reason = "unreadable_file" if exists else "missing_file"
      raise ExampleError(reason, f"cannot read {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
  if not data:
    raise ExampleError("empty_file", f"{example.locations[index]}: empty file")
  return data


def decode_error(location: str, error: Exception) -> ExampleError:
  """A PIL failure -> not_an_image, truncated_image or undecodable_image, with a message that is the same on
  every run (PIL's messages can name the address of a buffer object)."""
  if isinstance(error, UnidentifiedImageError):
    return ExampleError("not_an_image", f"{location}: not an image PIL can read")
  message = _stable_message(error)
  reason = "truncated_image" if "truncat" in message.lower() else "undecodable_image"
  return ExampleError(reason, f"{location}: {message}")


def video_error(location: str, error: Exception) -> ExampleError:
  """An FFmpeg failure (PyAV raises many types for bad files) -> undecodable_video."""
  return ExampleError("undecodable_video", f"{location}: {_stable_message(error)}")


def _stable_message(error: Exception) -> str:
  """The error's first line without object addresses, so the same file gives the same message on every run."""
  return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(error).__name__}: {error}").splitlines()[0]


def _check_frame_count(record, frames: int, options: ShardOptions) -> None:
  if frames > options.max_patches_per_image:
    raise ExampleError("too_many_frames", f"record {record.id!r}: {frames} frames do not fit a budget of "
                                          f"{options.max_patches_per_image} patches")


def plan_example(example: SourceExample, options: ShardOptions) -> Planned:
  """Reads the example's image (every frame of a video), checks that it is whole (cheaply:
  `image_ops.whole_image_size`), and decides the patch grid and kept token count from its header."""
  record = example.record
  frames = 1
  if record.video is not None:
    if not options.video:
      raise ExampleError("unsupported_video", f"record {record.id!r} is a video; build with --video to pack videos")
    if isinstance(record.video, tuple):
      frames = len(record.video)
    else:
      return _plan_video_file(example, options)
    _check_frame_count(record, frames, options)
  # Every frame is read and checked whole here, so that packing only places images the writer can decode;
  # the grid comes from the first frame.
  for frame in range(frames):
    data = read_location(example, frame)
    try:
      size = image_ops.whole_image_size(data)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files.
      raise decode_error(example.locations[frame], e) from None
    if frame == 0:
      height, width = size
  return _plan_grid(example, options, height, width, frames)


def _plan_video_file(example: SourceExample, options: ShardOptions) -> Planned:
  """A video file: decoded once here to count its frames and catch a broken file; `video_frames` of them are
  sampled (`beam_jobs.video`)."""
  data = read_location(example, 0)
  try:
    total, height, width = video_lib.probe(data)
  except Exception as e:  # noqa: BLE001
    raise video_error(example.locations[0], e) from None
  frames = len(video_lib.sample_indices(total, options.video_frames))
  _check_frame_count(example.record, frames, options)
  return dataclasses.replace(_plan_grid(example, options, height, width, frames), source_frames=total)


def _plan_grid(example: SourceExample, options: ShardOptions, height: int, width: int, frames: int) -> Planned:
  record = example.record
  budget = options.sampling.budget(options.seed, record.id, options.max_patches_per_image)
  resample = budget is not None
  per_frame = max(1, (options.max_patches_per_image if budget is None else budget) // frames)
  rows, cols = image_ops.fit_patch_grid(height, width, options.patch_size, per_frame, resample)
  total = frames * rows * cols
  tokens = options.dropping.kept_count(options.seed, record.id, total, options.max_patches_per_image)
  return Planned(example, rows, cols, frames, tokens)


@dataclasses.dataclass(frozen=True)
class Unplannable:
  """An example whose image could not be planned; it still goes to its window, where duplicate ids are
  resolved (the first line wins even when its image is bad), and becomes an error row there."""
  example: SourceExample
  reason: str
  detail: str

  @property
  def id(self) -> str:
    return self.example.record.id

  @property
  def line(self) -> int:
    return self.example.record.line


def to_blob(items: list) -> bytes:
  """Plans (or anything picklable) as one pickled element. After planning, plans travel in blobs of many: Beam
  encodes, sizes (it samples element sizes by encoding them) and moves one bytes object far more cheaply than
  a list of dataclasses, each pickled on its own, or one element per plan."""
  return pickle.dumps(items, pickle.HIGHEST_PROTOCOL)


_GC_PAUSE_LOCK = threading.Lock()
_gc_pause = {"depth": 0, "was_enabled": False}


@contextlib.contextmanager
def gc_paused():
  """The cyclic garbage collector off for the block, from whichever worker thread: the first to enter turns it
  off, the last to leave turns it back on if it was on."""
  with _GC_PAUSE_LOCK:
    if _gc_pause["depth"] == 0:
      _gc_pause["was_enabled"] = gc.isenabled()
      gc.disable()
    _gc_pause["depth"] += 1
  try:
    yield
  finally:
    with _GC_PAUSE_LOCK:
      _gc_pause["depth"] -= 1
      if _gc_pause["depth"] == 0 and _gc_pause["was_enabled"]:
        gc.enable()


def from_blob(blob: bytes) -> list:
  """The items of a blob. The garbage collector is paused meanwhile: unpickling thousands of small objects
  triggers collections that each walk every live object of the worker, which cost three times the unpickling
  itself; the objects made here hold no cycles."""
  with gc_paused():
    return pickle.loads(blob)


class PlanExamples(beam.DoFn):
  """SourceExample -> blobs of up to PLAN_BATCH Planned / Unplannable (in arrival order, which nothing after
  depends on)."""

  def __init__(self, options: ShardOptions):
    self._options = options
    self._planned = Metrics.counter(NAMESPACE, "examples_planned")
    self._failed = Metrics.counter(NAMESPACE, "examples_failed_planning")
    self._progress = _Progress("examples planned")
    self._batch: list = []

  def start_bundle(self):
    self._batch = []

  def process(self, example):  # a SourceExample (no annotation: Beam would type-check it against inferred unions)
    try:
      self._batch.append(plan_example(example, self._options))
      self._planned.inc()
      self._progress.add()
    except ExampleError as e:
      self._failed.inc()
      self._batch.append(Unplannable(example, e.reason, e.detail))
    if len(self._batch) >= PLAN_BATCH:
      yield to_blob(self._batch)
      self._batch = []

  def finish_bundle(self):
    if self._batch:
      yield WindowedValue(to_blob(self._batch), MIN_TIMESTAMP, [GlobalWindow()])
      self._batch = []


# ------------------------------------------------------------------------------------------------------- packing

def split_stats(planned: Iterable["Planned | Unplannable"]) -> dict[str, tuple[int, int]]:
  """split -> (examples, tokens) of the planned examples; the Beam job computes the same with a combiner."""
  out: dict[str, tuple[int, int]] = {}
  for p in planned:
    if isinstance(p, Planned):
      count, tokens = out.get(p.split, (0, 0))
      out[p.split] = (count + 1, tokens + p.tokens)
  return out


def split_tokens(blob: bytes):
  """A blob of plans -> (split, (examples, tokens)) per split in it, summed by the job into `split_stats`."""
  yield from split_stats(from_blob(blob)).items()


def shards_for_split(stats: tuple[int, int], options: ShardOptions) -> int:
  """Shards of a split: `num_shards`, fewer for a split too small to give every shard a sequence."""
  return max(1, min(options.num_shards, math.ceil(stats[1] / options.seq_len)))


def window_batches(blob: bytes, stats: dict[str, tuple[int, int]], options: ShardOptions):
  """A blob of plans -> (window, blob) per window it touches. Windows by a hash of the id over all splits, so
  all records of one id meet in one window."""
  windows = packing.num_windows(sum(count for count, _ in stats.values()), options.window_size)
  by_window: dict[int, list] = {}
  for item in from_blob(blob):
    by_window.setdefault(packing.window_of(item.id, windows), []).append(item)
  for window, items in sorted(by_window.items()):
    yield window, to_blob(items)


def bin_hash(split: str, ids: list[str]) -> str:
  return hashlib.sha256("\0".join([split] + ids).encode("utf-8")).hexdigest()[:32]


def assign_bins(split: str, bins: list[list[Planned]], salt: str, num_shards: int):
  """Bins -> ((split, shard, n), blob of [(bin hash, slot, planned), ...]), one element per shard that gets
  bins (Beam moves a few big elements much more cheaply than many small ones). Bins are ordered by a hash of their
  content and dealt round-robin from an offset drawn from `salt`, so shards are balanced and the assignment
  depends only on the content."""
  hashed = sorted((bin_hash(split, [p.id for p in b]), b) for b in bins)
  offset = packing.stable_hash(f"{split}\0{salt}") % num_shards
  per_shard: dict[tuple[str, int, int], list] = {}
  for rank, (h, members) in enumerate(hashed):
    key = (split, (offset + rank) % num_shards, num_shards)
    per_shard.setdefault(key, []).extend((h, slot, p) for slot, p in enumerate(members))
  for key in sorted(per_shard):
    yield key, to_blob(per_shard[key])


def pack_planned(planned: list[Planned], options: ShardOptions) -> list[list[Planned]]:
  by_id = {p.id: p for p in planned}
  bins = packing.pack_best_fit_decreasing([(p.id, p.tokens) for p in planned], options.seq_len, options.max_images)
  return [[by_id[k] for k in b] for b in bins]


class PackWindow(beam.DoFn):
  """One window: duplicate ids resolved (the lowest line wins, the others are errors), unplannable winners
  become errors, then each split's examples are packed best-fit decreasing. Finished bins are assigned to
  shards; the examples of partly filled bins go to the tail pool of their split. Also emits the window's
  largest label (for num_classes)."""

  def __init__(self, options: ShardOptions):
    self._options = options
    self._tail = Metrics.counter(NAMESPACE, "examples_to_tail_pool")
    self._duplicates = Metrics.counter(NAMESPACE, "duplicate_ids")

  def process(self, window_and_blobs, stats):
    window, blobs = window_and_blobs
    items = [item for blob in blobs for item in from_blob(blob)]
    opts = self._options
    by_id: dict[str, list] = {}
    max_label = -1
    for item in items:
      by_id.setdefault(item.id, []).append(item)
      max_label = max(max_label, item.example.record.label)
    yield beam.pvalue.TaggedOutput("labels", max_label)
    by_split: dict[str, list[Planned]] = {}
    for rid in sorted(by_id):
      first, *duplicates = sorted(by_id[rid], key=lambda it: it.line)
      for dup in duplicates:
        self._duplicates.inc()
        yield beam.pvalue.TaggedOutput(
            "errors", error_row(dup.line, rid, "duplicate_id", f"id {rid!r} first seen on line {first.line}"))
      if isinstance(first, Unplannable):
        yield beam.pvalue.TaggedOutput("errors", error_row(first.line, rid, first.reason, first.detail))
      else:
        by_split.setdefault(first.split, []).append(first)
    for split in sorted(by_split):
      planned = {p.id: p for p in by_split[split]}
      finished, tail = packing.pack_window([(p.id, p.tokens) for p in by_split[split]], opts.seq_len,
                                           opts.max_images)
      yield from assign_bins(split, [[planned[k] for k in b] for b in finished], f"window{window}",
                             shards_for_split(stats[split], opts))
      self._tail.inc(len(tail))
      if tail:
        yield beam.pvalue.TaggedOutput("tail", (split, to_blob([planned[k] for k, _ in tail])))


def pack_tail(split_and_blobs, stats, options: ShardOptions):
  split, blobs = split_and_blobs
  bins = pack_planned([p for blob in blobs for p in from_blob(blob)], options)
  yield from assign_bins(split, bins, "tail", shards_for_split(stats[split], options))


def _sum_pairs(pairs) -> tuple[int, int]:
  count, tokens = 0, 0
  for c, t in pairs:
    count, tokens = count + c, tokens + t
  return count, tokens


def empty_shard_markers(split_and_stats, options: ShardOptions):
  """One marker per shard of a split, so a shard that no bin lands in is still written (empty)."""
  split, stats = split_and_stats
  n = shards_for_split(stats, options)
  for shard in range(n):
    yield (split, shard, n), None


# ------------------------------------------------------------------------------------------------------ writing

def read_frames(planned: Planned) -> list[bytes]:
  """The encoded bytes of each location: the image, every frame image, or the one video file."""
  return [read_location(planned.example, i) for i in range(len(planned.example.locations))]


def read_ahead(planned: list[Planned], threads: int = REMOTE_READ_THREADS):
  """(frames bytes or None, ExampleError or None) per planned example, in order. Remote files (gs://, ...)
  are read up to `threads` at a time, a bounded distance ahead, so the writer does not wait on each request's
  latency in turn; local and inline ones are read as they come."""

  def attempt(p):
    try:
      return read_frames(p), None
    except ExampleError as e:
      return None, e

  if not any(p.example.data is None and "://" in p.example.locations[0] for p in planned):
    for p in planned:
      yield attempt(p)
    return
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending: collections.deque = collections.deque()
    items = iter(planned)
    for p in itertools.islice(items, 4 * threads):
      pending.append(pool.submit(attempt, p))
    while pending:
      result = pending.popleft().result()
      for p in itertools.islice(items, 1):
        pending.append(pool.submit(attempt, p))
      yield result


def _decode_frames(planned: Planned, frames: list[bytes], options: ShardOptions):
  """RGB arrays of the example's frames (one for an image), each resized to the planned grid."""
  p, rows, cols = options.patch_size, planned.rows, planned.cols
  if planned.source_frames:
    try:
      for pixels in video_lib.decode_sampled(frames[0], planned.source_frames, options.video_frames):
        yield image_ops.resize_to_grid(pixels, rows, cols, p)
    except MemoryError:
      raise  # the worker's trouble, not the file's: Beam retries the bundle
    except Exception as e:  # noqa: BLE001
      raise video_error(planned.example.locations[0], e) from None
    return
  for frame, data in enumerate(frames):
    try:
      yield image_ops.decode_resized(data, rows * p, cols * p)
    except MemoryError:
      raise  # the worker's trouble, not the file's: Beam retries the bundle
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files.
      raise decode_error(planned.example.locations[frame], e) from None


def render_example(planned: Planned, options: ShardOptions, frames: list[bytes] | None = None,
                   out: np.ndarray | None = None) -> dict[str, Any]:
  """Decodes, resizes and patchifies one planned example (every frame of a video), then drops tokens. The kept
  patches go to `out` when given (rows of the sequence's patch buffer, at least `planned.tokens` of them), so
  each patch is copied once, from the decoded image to the record; `patches` in the result is that view."""
  p, rows, cols = options.patch_size, planned.rows, planned.cols
  frames = read_frames(planned) if frames is None else frames
  per_frame = rows * cols
  total = planned.frames * per_frame
  kept = options.dropping.kept_indices(options.seed, planned.id, total, options.max_patches_per_image)
  if len(kept) != planned.tokens:  # cannot happen: both come from the same seeded draw.
    raise AssertionError(f"{planned.id}: planned {planned.tokens} tokens, rendered {len(kept)}")
  patch_dim = p * p * 3
  if out is None:
    out = np.empty((len(kept), patch_dim), np.uint8)
  dropping = len(kept) < total
  target = np.empty((total, patch_dim), np.uint8) if dropping else out[:total]
  for frame, pixels in enumerate(_decode_frames(planned, frames, options)):
    image_ops.patchify_into(pixels, p, target[frame * per_frame:(frame + 1) * per_frame])
  yx = image_ops.patch_positions(rows, cols)
  if planned.frames > 1:
    yx = np.tile(yx, (planned.frames, 1))
  t = np.repeat(np.arange(planned.frames, dtype=np.int32), per_frame)
  if dropping:
    out[:len(kept)] = target[kept]
    yx, t = yx[kept], t[kept]
  record = planned.example.record
  text = text_lib.tokenize(record.text, options.tokenizer) if options.text_len and record.text else None
  boxes = np.asarray(record.boxes or np.zeros((0, 4)), dtype="<f4").reshape(-1, 4)
  return {"id": record.id, "label": record.label, "patches": out[:len(kept)], "yx": yx, "t": t,
          "grid": (rows, cols), "text_tokens": text, "boxes": boxes, "dropped": total - len(kept)}


def sequence_fields(examples: list[dict[str, Any]], spec: PackedSpec,
                    patch_buffer: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], list, int]:
  """Lays out the examples of one bin as one fixed-shape packed example (segment m = slot m-1). Returns every
  field but `patches`, the patches as a list of buffers whose concatenation is that field (so the big array is
  copied once, when the record is serialized), and the number of text tokens cut because the sequence's text
  budget was full. `patch_buffer`: the [L, p*p*3] array the examples' patches were rendered into, in slot order
  from row 0, zero after them; it is then the one chunk."""
  out = spec.empty(patches=False)
  chunks = []
  pos, text_pos, text_cut = 0, 0, 0
  for slot, ex in enumerate(examples):
    n = len(ex["patches"])
    if patch_buffer is None:
      chunks.append(memoryview(np.ascontiguousarray(ex["patches"], dtype=np.uint8)).cast("B"))
    out["patch_yx"][pos:pos + n] = ex["yx"]
    if spec.video:
      out["patch_t"][pos:pos + n] = ex["t"]
      out["boxes"][slot] = ex["boxes"].tobytes()
    out["segment_ids"][pos:pos + n] = slot + 1
    out["image_grid"][slot] = ex["grid"]
    out["labels"][slot] = ex["label"]
    out["example_ids"][slot] = ex["id"].encode("utf-8")
    if spec.text_len and ex["text_tokens"] is not None:
      tokens = ex["text_tokens"][:spec.text_len - text_pos]
      out["text_tokens"][text_pos:text_pos + len(tokens)] = tokens
      out["text_segment_ids"][text_pos:text_pos + len(tokens)] = slot + 1
      text_pos += len(tokens)
      text_cut += len(ex["text_tokens"]) - len(tokens)
    pos += n
  if pos > spec.seq_len:
    raise AssertionError(f"{pos} tokens packed into a sequence of {spec.seq_len}")
  if patch_buffer is not None:
    chunks = [patch_buffer.reshape(-1)]
  elif pos < spec.seq_len:
    chunks.append(bytes((spec.seq_len - pos) * spec.patch_dim))
  return out, chunks, text_cut


def assemble_sequence(examples: list[dict[str, Any]], spec: PackedSpec) -> tuple[dict[str, np.ndarray], int]:
  """`sequence_fields` as plain arrays of the contract's shapes (what a reader decodes)."""
  fields, chunks, text_cut = sequence_fields(examples, spec)
  patches = np.frombuffer(b"".join(chunks), np.uint8).reshape(spec.seq_len, spec.patch_dim)
  return {"patches": patches, **fields}, text_cut


def sequence_pieces(fields: dict[str, np.ndarray], patch_chunks: list, spec: PackedSpec) -> tuple[list, int]:
  """The packed example as the pieces of its tf.train.Example bytes, and their total length."""
  features = {}
  for name, (dtype, _) in spec.fields().items():
    if name == "patches":
      features[name] = ("chunks", patch_chunks)
    elif dtype == "uint8":
      features[name] = ("bytes", [np.ascontiguousarray(fields[name]).tobytes()])
    elif dtype == "bytes":
      features[name] = ("bytes", list(fields[name]))
    else:
      features[name] = ("int64", fields[name])
  return tfrecord.example_pieces(features)


def encode_sequence(fields: dict[str, np.ndarray], patch_chunks: list, spec: PackedSpec) -> bytes:
  """The packed example as tf.train.Example bytes (the same bytes as PackedSpec.to_tf_example_bytes)."""
  return b"".join(sequence_pieces(fields, patch_chunks, spec)[0])


def token_buckets(seq_len: int) -> list[int]:
  """Lower bounds of the tokens-per-image histogram buckets: 1, 2, 4, ... (powers of two up to seq_len)."""
  return [1 << k for k in range(seq_len.bit_length())]


def shard_path(output_dir: str, split: str, shard: int, num_shards: int) -> tuple[str, str]:
  rel = f"{split}/shard-{shard:05d}-of-{num_shards:05d}.tfrecord"
  return rel, FileSystems.join(output_dir, split, f"shard-{shard:05d}-of-{num_shards:05d}.tfrecord")


def record_bytes_bound(spec: PackedSpec) -> int:
  """About the most bytes one framed packed example takes: the patches plus up to 32 bytes per token for the
  per-token fields, 20 per text token, 4 KiB for the per-slot ones. Only sizes a reservation, so a record
  with unusually long ids may exceed it."""
  return spec.seq_len * (spec.patch_dim + 32) + spec.text_len * 20 + 4096


class WriteShard(beam.DoFn):
  """(split, shard, n) and its examples -> one shard file, written once under a temporary name and renamed.

  Sequences are in the order of their content hash and examples in their slot order, so the bytes depend only
  on the inputs and options. Planning has checked every file whole, so a decode failure here is rare (pixel
  data that is corrupt inside a whole file, or a file changed since planning); such an example leaves its
  sequence one image short and becomes an error row.
  """

  def __init__(self, output_dir: str, options: ShardOptions):
    self._output_dir, self._options = output_dir, options
    self._images = Metrics.counter(NAMESPACE, "images_written")
    self._sequences = Metrics.counter(NAMESPACE, "sequences_written")
    self._failed = Metrics.counter(NAMESPACE, "images_failed_decoding")
    self._progress = _Progress("images decoded and written")

  def process(self, key_and_items):
    (split, shard, num_shards), items = key_and_items
    opts, spec = self._options, self._options.spec
    bins: dict[str, list[tuple[int, Planned]]] = {}
    for blob in items:
      for h, slot, planned in from_blob(blob) if blob is not None else ():  # None: a shard's marker
        bins.setdefault(h, []).append((slot, planned))
    rel, path = shard_path(self._output_dir, split, shard, num_shards)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    buckets = token_buckets(opts.seq_len)
    stats = {"path": rel, "split": split, "num_sequences": 0, "num_images": 0, "num_tokens": 0,
             "tokens_dropped": 0, "text_tokens_truncated": 0, "tokens_per_image": [0] * len(buckets),
             "images_per_sequence": [0] * (opts.max_images + 1)}
    digest = hashlib.sha256()
    ordered = [(h, [planned for _, planned in sorted(bins[h], key=lambda sp: sp[0])]) for h in sorted(bins)]
    with shard_file.create(tmp, is_local(tmp), len(ordered) * record_bytes_bound(spec)) as f:
      reads = read_ahead([planned for _, members in ordered for planned in members])
      buffer = np.empty((spec.seq_len, spec.patch_dim), np.uint8)  # each record's patches, rendered in place
      for h, members in ordered:
        examples, pos = [], 0
        for planned in members:
          frames, error = next(reads)
          try:
            if error is not None:
              raise error
            examples.append(render_example(planned, opts, frames, buffer[pos:]))
            pos += len(examples[-1]["patches"])
          except ExampleError as e:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput("errors", error_row(planned.line, planned.id, e.reason, e.detail))
        if not examples:
          continue
        buffer[pos:] = 0  # padding (and whatever a failed example or the previous record left there)
        fields, chunks, text_cut = sequence_fields(examples, spec, buffer)
        for piece in tfrecord.record_pieces(*sequence_pieces(fields, chunks, spec)):
          f.write(piece)
          digest.update(piece)
        stats["num_sequences"] += 1
        stats["num_images"] += len(examples)
        stats["images_per_sequence"][len(examples)] += 1
        stats["text_tokens_truncated"] += text_cut
        for ex in examples:
          stats["num_tokens"] += len(ex["patches"])
          stats["tokens_dropped"] += ex["dropped"]
          stats["tokens_per_image"][len(ex["patches"]).bit_length() - 1] += 1
        self._images.inc(len(examples))
        self._sequences.inc()
        self._progress.add(len(examples))
    FileSystems.rename([tmp], [path])
    stats["sha256"] = digest.hexdigest()
    yield stats


# ------------------------------------------------------------------------------------------------------ summary

def summarize(shards: list[dict[str, Any]], errors: list[dict[str, Any]], num_lines: int, options: ShardOptions,
              num_classes: int, class_names: tuple[str, ...], source: str) -> dict[str, Any]:
  shards = sorted(shards, key=lambda s: s["path"])
  splits: dict[str, dict[str, Any]] = {}
  tokens_hist = [0] * len(token_buckets(options.seq_len))
  images_hist = [0] * (options.max_images + 1)
  for s in shards:
    acc = splits.setdefault(s["split"], {"num_examples": 0, "num_sequences": 0, "num_tokens": 0, "num_shards": 0})
    acc["num_examples"] += s["num_images"]
    acc["num_sequences"] += s["num_sequences"]
    acc["num_tokens"] += s["num_tokens"]
    acc["num_shards"] += 1
    tokens_hist = [a + b for a, b in zip(tokens_hist, s["tokens_per_image"])]
    images_hist = [a + b for a, b in zip(images_hist, s["images_per_sequence"])]
  for acc in splits.values():
    acc["packing_efficiency"] = acc["num_tokens"] / max(1, acc["num_sequences"] * options.seq_len)
  num_sequences = sum(s["num_sequences"] for s in shards)
  real_tokens = sum(s["num_tokens"] for s in shards)
  errors_by_reason: dict[str, int] = {}
  for e in errors:
    errors_by_reason[e["reason"]] = errors_by_reason.get(e["reason"], 0) + 1
  return {
      "schema_version": SCHEMA_VERSION, "fingerprint": FINGERPRINT,
      "seq_len": options.seq_len, "patch_size": options.patch_size, "max_images": options.max_images,
      "text_len": options.text_len, "max_patches_per_image": options.max_patches_per_image,
      "tokenizer": text_lib.describe(options.tokenizer) if options.text_len else None,
      "video": options.video, "num_classes": num_classes, "class_names": list(class_names),
      "num_examples": sum(s["num_examples"] for s in splits.values()), "num_sequences": num_sequences,
      "num_manifest_lines": num_lines, "num_errors": len(errors), "errors_by_reason": dict(sorted(errors_by_reason.items())),
      "packing_efficiency": real_tokens / max(1, num_sequences * options.seq_len),
      "tokens_dropped": sum(s["tokens_dropped"] for s in shards),
      "text_tokens_truncated": sum(s["text_tokens_truncated"] for s in shards),
      "histograms": {
          "tokens_per_image": {"bucket_lower_bounds": token_buckets(options.seq_len), "counts": tokens_hist},
          "images_per_sequence": {"images": list(range(options.max_images + 1)), "counts": images_hist},
      },
      "splits": dict(sorted(splits.items())),
      "shards": [{k: s[k] for k in ("path", "split", "sha256", "num_sequences", "num_images", "num_tokens")}
                 for s in shards],
      "source": source, "options": options.to_json(),
  }


def _write_text(path: str, text: str) -> None:
  """Writes a small file through FileSystems under a temporary name, then renames it."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
  with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(text.encode("utf-8"))
  FileSystems.rename([tmp], [path])


def _read_text(path: str) -> str:
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read().decode("utf-8")


def write_info(_, shards, errors, window_labels, output_dir, options, class_names, source):
  errors = sorted(errors, key=lambda e: (e["line"], e["reason"], e["id"] or ""))
  num_lines = sum(s["num_images"] for s in shards) + len(errors)
  num_classes = len(class_names) or max(1, max(window_labels, default=-1) + 1)
  info = summarize(list(shards), errors, num_lines, options, num_classes, class_names, source)
  _write_text(FileSystems.join(output_dir, info_lib.ERRORS_FILENAME),
              "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors))
  _write_text(FileSystems.join(output_dir, info_lib.FILENAME), json.dumps(info, indent=1, sort_keys=True))


class BuildShards(beam.PTransform):
  """{"examples", "errors"} of a source -> shard files; returns {"shards": shard stats, "errors": error rows,
  "labels": the largest label of each window}. Every source record ends as exactly one written image or one
  error row, so the number of records is the sum of the two."""

  def __init__(self, output_dir: str, options: ShardOptions):
    super().__init__()
    self._output_dir, self._options = output_dir, options

  def expand(self, source):
    opts = self._options
    examples, source_errors = source["examples"], source["errors"]
    planned = examples | "Plan" >> beam.ParDo(PlanExamples(opts))  # blobs of plans
    stats = (planned
             | "SplitTokens" >> beam.FlatMap(split_tokens)
             | "SumPerSplit" >> beam.CombinePerKey(_sum_pairs))
    stats_side = beam.pvalue.AsDict(stats)
    windows = (planned
               | "KeyByWindow" >> beam.FlatMap(window_batches, stats_side, opts)
               | "GroupByWindow" >> beam.GroupByKey()
               | "PackWindow" >> beam.ParDo(PackWindow(opts), stats_side).with_outputs(
                   "tail", "errors", "labels", main="assigned"))
    tail = (windows.tail
            | "GroupTailBySplit" >> beam.GroupByKey()
            | "PackTail" >> beam.FlatMap(pack_tail, stats_side, opts))
    markers = stats | "EmptyShardMarkers" >> beam.FlatMap(empty_shard_markers, opts)
    written = ((windows.assigned, tail, markers)
               | "AllAssigned" >> beam.Flatten()
               | "GroupByShard" >> beam.GroupByKey()
               | "WriteShard" >> beam.ParDo(WriteShard(self._output_dir, opts)).with_outputs("errors", main="shards"))
    errors = (source_errors, windows.errors, written.errors) | "AllErrors" >> beam.Flatten()
    # One int per window: the maximum is taken where it is used (a CombineGlobally would add ten transforms to
    # every run's start-up for it).
    return {"shards": written.shards, "errors": errors, "labels": windows.labels}


# ------------------------------------------------------------------------------------------------------- driver

def pipeline_runner(beam_args: list[str] | None, workers: int | None):
  """(runner, PipelineOptions): Beam's in-process FnApiRunner unless the Beam args name a runner."""
  beam_args = list(beam_args or [])
  options = PipelineOptions(beam_args)
  if options.get_all_options().get("runner"):
    if workers and workers > 1:
      print("build_shards: --workers applies to the local runner only; the named runner sizes itself",
            file=sys.stderr)
    return None, options
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  direct = options.view_as(DirectOptions)
  if workers is not None:
    direct.direct_num_workers = workers
    if not any(a.startswith("--direct_running_mode") for a in beam_args):
      # Threads, not processes: the heavy parts (JPEG/PNG decoding, resizing, sha256, file IO) release the GIL,
      # and each worker process would first spend about 3 CPU-seconds importing Beam's SDK harness.
      direct.direct_running_mode = "multi_threading" if workers > 1 else "in_memory"
  if not any(a.startswith(("--pipeline_type_check", "--no_pipeline_type_check")) for a in beam_args):
    # Beam's construction-time type inference costs ~0.07 s of each local run's ~0.4 s start-up and checks
    # nothing these DoFns declare; `-- --pipeline_type_check` turns it back on.
    options.view_as(TypeOptions).pipeline_type_check = False
  return FnApiRunner(), options  # in-process; naming it keeps Beam from fetching a Prism binary.


def _input_fingerprint(path: str) -> str | None:
  if not is_local(path):
    digest = hashlib.sha256()
    digest.update(FileSystems.split(path)[1].encode() + b"\0")
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()
  return fingerprint_path(path)


def is_local(path: str) -> bool:
  return "://" not in path


def _cleanup_stale(output_dir: str, info: dict[str, Any]) -> None:
  """Removes shard files of an earlier build with another shard count, and temporary files of killed runs."""
  keep = {s["path"] for s in info["shards"]}
  pattern = FileSystems.join(output_dir, "*", "shard-*-of-*.tfrecord*")
  try:
    matched = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
  except Exception:  # noqa: BLE001 - nothing matched.
    return
  stale = [p for p in matched if "/".join(p.split("/")[-2:]) not in keep]
  if stale:
    FileSystems.delete(stale)


@contextlib.contextmanager
def _heap_frozen(in_process: bool):
  """For a run in this process: the objects that exist before it (Beam's and every imported module's, ~10^5)
  are set aside from garbage collection meanwhile, so each full collection that the job's allocations trigger
  walks the job's own objects only (50 ms less each). Left alone when the caller froze objects itself."""
  if not in_process or gc.get_freeze_count():
    yield
    return
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


def build_shards(manifest: str, output_dir: str, options: ShardOptions = ShardOptions(),
                 beam_args: list[str] | None = None, workers: int | None = None,
                 tfds_data_dir: str | None = None, manifest_chunk_bytes: int | None = None) -> dict[str, Any]:
  """Runs the whole job; returns dataset_info. `manifest` is a manifest path (local or gs://), `synthetic[:...]`
  or `tfds:NAME`. Raises ContractError, after writing errors.jsonl and dataset_info.json, when more than
  `max_error_fraction` of the records are bad."""
  kwargs = {"chunk_bytes": manifest_chunk_bytes} if manifest_chunk_bytes else {}
  source = resolve_source(manifest, tfds_data_dir, **kwargs)
  if options.tokenizer:
    text_lib.describe(options.tokenizer)  # a bad model file fails here, before any work, naming the file
  if is_local(output_dir):
    import os
    os.makedirs(output_dir, exist_ok=True)
  runner, pipeline_options = pipeline_runner(beam_args, workers)
  runner_name = type(runner).__name__ if runner else pipeline_options.get_all_options()["runner"]
  mode = pipeline_options.view_as(DirectOptions)
  print(f"build_shards: {source.description} -> {output_dir} (runner {runner_name}"
        + (f", {mode.direct_num_workers} worker(s), {mode.direct_running_mode}" if runner else "") + ")",
        file=sys.stderr, flush=True)
  start = time.monotonic()
  pipeline = beam.Pipeline(runner=runner, options=pipeline_options)
  outputs = pipeline | "Source" >> source.transform | "BuildShards" >> BuildShards(output_dir, options)
  _ = (pipeline | "Once" >> beam.Create([None])
       | "WriteInfo" >> beam.Map(write_info, beam.pvalue.AsList(outputs["shards"]),
                                 beam.pvalue.AsList(outputs["errors"]), beam.pvalue.AsList(outputs["labels"]),
                                 output_dir, options,
                                 source.class_names, source.description))
  with _heap_frozen(in_process=runner is not None):
    result = pipeline.run()
    result.wait_until_finish()
  seconds = time.monotonic() - start
  info = json.loads(_read_text(FileSystems.join(output_dir, info_lib.FILENAME)))
  info_lib.validate_dataset_info(info, FileSystems.join(output_dir, info_lib.FILENAME))
  _cleanup_stale(output_dir, info)
  lineage = {"step": "build_shards", "git_revision": git_revision(), "schema_version": SCHEMA_VERSION,
             "config": {**options.to_json(), "source": source.description, "runner": runner_name,
                        "workers": workers, "beam_args": list(beam_args or [])},
             "inputs": {"manifest": {"path": manifest, "fingerprint": (
                 _input_fingerprint(source.manifest_path) if source.manifest_path else None)}}}
  _write_text(FileSystems.join(output_dir, LINEAGE_FILENAME), json.dumps(lineage, indent=1, sort_keys=True))
  _print_counters(result)
  if info["num_manifest_lines"] == 0:
    raise ContractError(f"manifest {manifest!r}: no records")
  if info["num_errors"] > options.max_error_fraction * info["num_manifest_lines"]:
    errors_path = FileSystems.join(output_dir, info_lib.ERRORS_FILENAME)
    first = json.loads(_read_text(errors_path).splitlines()[0])
    detail = first["detail"].removeprefix(f"{manifest}:{first['line']}: ")
    raise ContractError(
        f"{info['num_errors']} of {info['num_manifest_lines']} manifest records failed (max_error_fraction "
        f"{options.max_error_fraction}); first: {manifest}:{first['line']}: {first['reason']}: {detail} "
        f"(all in {errors_path})")
  print(f"build_shards: {info['num_examples']} images -> {info['num_sequences']} sequences in "
        f"{len(info['shards'])} shards, packing efficiency {info['packing_efficiency']:.4f}, "
        f"{info['num_errors']} errors, {seconds:.1f} s", file=sys.stderr, flush=True)
  return info


def _print_counters(result) -> None:
  try:
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))["counters"]
  except Exception:  # noqa: BLE001 - not every runner reports metrics.
    return
  totals: dict[str, int] = {}
  for c in counters:
    totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
  if totals:
    print("build_shards: counters " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())),
          file=sys.stderr, flush=True)
