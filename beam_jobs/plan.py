"""The shard builder's first stage: each source example's files are read and checked whole, and its patch grid
and token count decided from the image header, before any pixel is decoded. Only these plans travel through the
job's shuffles; an example that cannot be planned travels as `Unplannable` and becomes an error row when its
packing window has resolved duplicate ids.
"""

import dataclasses
import os
import re
import stat
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from PIL import UnidentifiedImageError

from beam_jobs import image_ops
from beam_jobs import video as video_lib
from beam_jobs.options import ShardOptions
from beam_jobs.runtime import NAMESPACE, Progress, to_blob
from beam_jobs.sources import SourceExample
from schemas.manifest import tubelet_frame_error

PLAN_BATCH = 1024  # plans per element after planning


class ExampleError(Exception):
  """A source example's own failure (a missing, empty or broken file, a record the options refuse): it becomes
  one error row with `reason`, never the job's failure."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason, self.detail = reason, detail


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


class PlanExamples(beam.DoFn):
  """SourceExample -> blobs of up to PLAN_BATCH Planned / Unplannable (in arrival order, which nothing after
  depends on)."""

  def __init__(self, options: ShardOptions):
    self._options = options
    self._planned = Metrics.counter(NAMESPACE, "examples_planned")
    self._failed = Metrics.counter(NAMESPACE, "examples_failed_planning")
    self._progress = Progress("examples planned")
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
    data = read_location(example, frame, options.max_file_bytes)
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
  data = read_location(example, 0, options.max_file_bytes)
  try:
    total, height, width = video_lib.probe(data)
  except Exception as e:  # noqa: BLE001
    raise video_error(example.locations[0], e) from None
  record = example.record
  error = tubelet_frame_error(record.tubelets, total) if record.tubelets else None
  if error:  # the manifest parser checks a frame list's tubelets; a file's frames are counted only here
    raise ExampleError("invalid_record", f"line {record.line} (id {record.id!r}): {error}")
  frames = len(video_lib.sample_indices(total, options.video_frames))
  _check_frame_count(record, frames, options)
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


def _check_frame_count(record, frames: int, options: ShardOptions) -> None:
  if frames > options.max_patches_per_image:
    raise ExampleError("too_many_frames", f"record {record.id!r}: {frames} frames do not fit a budget of "
                                          f"{options.max_patches_per_image} patches")


def is_local(path: str) -> bool:
  return "://" not in path


_FILESYSTEMS: dict[str | None, Any] = {}


def _filesystem(path: str):
  """FileSystems.get_filesystem, cached per scheme: the lookup walks every FileSystem subclass on each call,
  which costs more than reading a small local file."""
  scheme = FileSystems.get_scheme(path)
  if scheme not in _FILESYSTEMS:
    _FILESYSTEMS[scheme] = FileSystems.get_filesystem(path)
  return _FILESYSTEMS[scheme]


def read_location(example: SourceExample, index: int, max_bytes: int) -> bytes:
  """The encoded bytes of the example's image (or frame `index`), inline or read through FileSystems: only a
  regular file (a FIFO, a device or a directory is `not_a_file`) of at most `max_bytes` (else
  `file_too_large`), never reading more than that."""
  if example.data is not None:
    data = example.data[index]
    if len(data) > max_bytes:
      raise ExampleError("file_too_large", f"{example.locations[index]}: {len(data)} bytes, over "
                                           f"--max-file-bytes {max_bytes}")
  else:
    path = example.locations[index]
    try:
      data = _read_local(path, max_bytes) if is_local(path) else _read_remote(path, max_bytes)
    except ExampleError:
      raise
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


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _read_local(path: str, max_bytes: int) -> bytes:
  """A local regular file of at most max_bytes, in one read sized by fstat (Beam's local open would add a
  buffered reader and a codec probe). O_NONBLOCK: opening a FIFO would otherwise wait for a writer; the file
  is checked on its descriptor, so it cannot be swapped between the check and the read."""
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a file")
      raise ExampleError("not_a_file", f"{path}: not a regular file ({kind})")
    if st.st_size > max_bytes:
      raise ExampleError("file_too_large", f"{path}: {st.st_size} bytes, over --max-file-bytes {max_bytes}")
    f = open(fd, "rb", buffering=0)  # noqa: SIM115 - it owns the descriptor from here
  except BaseException:
    os.close(fd)
    raise
  with f:
    return _read_capped(f, path, st.st_size, max_bytes)


def _read_remote(path: str, max_bytes: int) -> bytes:
  """A remote object of at most max_bytes; its size comes from the reader's metadata (gs:// readers know it
  when opened), so a larger object is refused without downloading it."""
  with _filesystem(path).open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size > max_bytes:
      raise ExampleError("file_too_large", f"{path}: {size} bytes, over --max-file-bytes {max_bytes}")
    return _read_capped(f, path, size, max_bytes)


def _read_capped(f, path: str, size: int, max_bytes: int) -> bytes:
  """The file's bytes to its end, never more than max_bytes + 1 of them: the first read asks for the stated
  `size` plus one byte, later ones (a file that grew, a size that lied, a short read) for at most 64 KiB."""
  chunks, total, want = [], 0, size + 1
  while chunk := f.read(want):
    chunks.append(chunk)
    total += len(chunk)
    if total > max_bytes:
      raise ExampleError("file_too_large", f"{path}: more than {max_bytes} bytes, over --max-file-bytes "
                                           f"{max_bytes}")
    want = min(max_bytes + 1 - total, 1 << 16)
  return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
