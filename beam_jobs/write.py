"""The shard builder's last stage: a shard's bins -> one TFRecord file. Each example is read again, decoded,
resized to its planned grid and patchified straight into its sequence's patch buffer, tokens are dropped, and
each bin is laid out as one fixed-shape packed example and written as its tf.train.Example bytes
(`schemas.tfrecord`), in the order of the bins' content hashes, so the bytes depend only on inputs and options.
"""

import collections
import concurrent.futures
import hashlib
import itertools
import uuid
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_jobs import image_ops, shard_file
from beam_jobs import text as text_lib
from beam_jobs import video as video_lib
from beam_jobs.options import ShardOptions
from beam_jobs.plan import ExampleError, Planned, decode_error, is_local, read_location, video_error
from beam_jobs.runtime import NAMESPACE, Progress, from_blob
from beam_jobs.sources import error_row
from schemas import tfrecord
from schemas.errors import ContractError
from schemas.manifest import Tubelet, split_name_problem
from schemas.packed import NO_CLIP_LABEL, TUBELET_FIELDS, PackedSpec

REMOTE_READ_THREADS = 16


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
    self._progress = Progress("images decoded and written")

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
             "images_per_sequence": [0] * (opts.max_images + 1), "max_frames": 0, "max_actors": 0,
             "num_bytes": 0}
    digest, crcs = hashlib.sha256(), hashlib.sha256()  # of the file; of its records' data CRCs
    ordered = [(h, [planned for _, planned in sorted(bins[h], key=lambda sp: sp[0])]) for h in sorted(bins)]
    try:
      with shard_file.create(tmp, is_local(tmp), len(ordered) * opts.record_bytes_bound()) as f:
        reads = read_ahead([planned for _, members in ordered for planned in members], opts.max_file_bytes)
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
          pieces = tfrecord.record_pieces(*sequence_pieces(fields, chunks, spec))
          for piece in pieces:
            f.write(piece)
            digest.update(piece)
            stats["num_bytes"] += len(piece)
          crcs.update(pieces[-1][-4:])  # a record's last 4 bytes: its data CRC (tfrecord.RecordIndex)
          stats["num_sequences"] += 1
          stats["num_images"] += len(examples)
          stats["images_per_sequence"][len(examples)] += 1
          stats["text_tokens_truncated"] += text_cut
          for ex in examples:
            stats["num_tokens"] += len(ex["patches"])
            stats["tokens_dropped"] += ex["dropped"]
            stats["tokens_per_image"][len(ex["patches"]).bit_length() - 1] += 1
            stats["max_frames"] = max(stats["max_frames"], ex["frames"])
            stats["max_actors"] = max(stats["max_actors"], len(ex["tube_labels"]))
          self._images.inc(len(examples))
          self._sequences.inc()
          self._progress.add(len(examples))
      FileSystems.rename([tmp], [path])
    except BaseException:
      # A full disk, a worker error or the job stopping: no temporary file stays behind to fill the volume.
      remove_quietly(tmp)
      raise
    stats["sha256"], stats["crc_digest"] = digest.hexdigest(), crcs.hexdigest()
    yield stats


def remove_quietly(path: str) -> None:
  """Deletes a file if it is there; a failure to delete must not hide the error being handled."""
  try:
    if FileSystems.exists(path):
      FileSystems.delete([path])
  except Exception:  # noqa: BLE001
    pass


def read_frames(planned: Planned, max_bytes: int) -> list[bytes]:
  """The encoded bytes of each location: the image, every frame image, or the one video file."""
  return [read_location(planned.example, i, max_bytes) for i in range(len(planned.example.locations))]


def read_ahead(planned: list[Planned], max_bytes: int, threads: int = REMOTE_READ_THREADS):
  """(frames bytes or None, ExampleError or None) per planned example, in order. Remote files (gs://, ...)
  are read up to `threads` at a time, a bounded distance ahead, so the writer does not wait on each request's
  latency in turn; local and inline ones are read as they come."""

  def attempt(p):
    try:
      return read_frames(p, max_bytes), None
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
  frames = read_frames(planned, options.max_file_bytes) if frames is None else frames
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
  frame_t = np.asarray(source_frame_indices(planned, options), "<i4")
  tube_labels, tube_boxes, tube_present = tubelets_at_frames(record.tubelets or (), frame_t)
  return {"id": record.id, "label": NO_CLIP_LABEL if record.label is None else record.label,
          "patches": out[:len(kept)], "yx": yx, "t": t, "grid": (rows, cols), "text_tokens": text, "boxes": boxes,
          "frames": planned.frames, "frame_t": frame_t, "tube_labels": tube_labels, "tube_boxes": tube_boxes,
          "tube_present": tube_present, "dropped": total - len(kept)}


def source_frame_indices(planned: Planned, options: ShardOptions) -> list[int]:
  """The source clip's frame index t of each frame packed: the sampled frames of a video file, every frame of a
  frame list; none for an image."""
  if planned.source_frames:
    return video_lib.sample_indices(planned.source_frames, options.video_frames)
  return list(range(planned.frames)) if planned.example.record.video is not None else []


def tubelets_at_frames(tubelets: tuple[Tubelet, ...], frame_t: np.ndarray):
  """Each actor's label (int32 [A]), its box at each packed frame (float32 [A, F, 4], zeros where it has
  none) and where it has one (uint8 [A, F]): a box goes to the frame whose source index is its t, exactly, and
  boxes on frames that were not sampled are left out."""
  frame_of = {int(t): f for f, t in enumerate(frame_t)}
  labels = np.array([tube.label for tube in tubelets], "<i4")
  boxes = np.zeros((len(tubelets), len(frame_t), 4), "<f4")
  present = np.zeros((len(tubelets), len(frame_t)), np.uint8)
  for a, tube in enumerate(tubelets):
    for t, *box in tube.boxes:
      if t in frame_of:
        boxes[a, frame_of[t]] = box
        present[a, frame_of[t]] = 1
  return labels, boxes, present


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
      for name in TUBELET_FIELDS:
        out[name][slot] = ex[name].tobytes()
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
  """(path relative to output_dir, full path) of a shard; a split that could name a path outside output_dir
  (`..`, a separator) is refused here too, whatever source it came from."""
  if split_name_problem(split):
    raise ContractError(f"split {split!r}: a split name {split_name_problem(split)}")
  rel = f"{split}/shard-{shard:05d}-of-{num_shards:05d}.tfrecord"
  return rel, FileSystems.join(output_dir, split, f"shard-{shard:05d}-of-{num_shards:05d}.tfrecord")
