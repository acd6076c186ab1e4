"""A predictions table (Parquet, schemas/predictions.py) read as a stream of chunks: the score column as
float32 [n, K] and the labels, checked row by row; a bad row is an error that names it (and its example_id).

Memory: one chunk (about 32 MB of scores) being worked on and at most two decoded ahead by a reader thread,
plus the per-row `split` / `shift` codes and `ood` flags read when the file is opened. Local files, gs://
objects (google-cloud-storage range requests) and other pyarrow URIs read the same way.
"""

import os
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import storage
from schemas.errors import ContractError

CHUNK_FLOATS = 1 << 23          # about 32 MB of float32 scores per chunk
READ_BUFFER_BYTES = 1 << 20
GCS_READ_BYTES = 1 << 23         # bytes per range request to gs:// (a multiple of 256 KiB)
READ_THREADS = 1                # a second reader cost ~1 CPU s and ~300 MB more on 1M x 1000 here, for no gain
SCORE_COLUMNS = ("logits", "probs")


@dataclass
class Source:
  """An opened predictions file: which score column, how many rows and classes, the per-row group codes."""
  path: str
  file: pq.ParquetFile
  score: str
  num_rows: int
  num_classes: int
  groups: dict = field(default_factory=dict)     # kind ("split", "shift") -> (codes int32 [N], names)
  ood: np.ndarray | None = None

  @property
  def rows_per_chunk(self) -> int:
    return max(1, CHUNK_FLOATS // max(self.num_classes, 1))


def _open_file(path: str) -> pq.ParquetFile:
  if storage.is_gcs(path):
    # google-cloud-storage (as everywhere in patchflow: it honours STORAGE_EMULATOR_HOST) behind a seekable
    # reader that fetches GCS_READ_BYTES per range request, so row groups stream as from a local file.
    if not storage.exists(path):
      raise ContractError(f"{path}: no such file")
    return pq.ParquetFile(storage.open_file(path, "rb", chunk_size=GCS_READ_BYTES), pre_buffer=False,
                          buffer_size=READ_BUFFER_BYTES)
  if "://" in path:
    from pyarrow import fs
    filesystem, inner = fs.FileSystem.from_uri(path)
    return pq.ParquetFile(filesystem.open_input_file(inner), pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
  if not os.path.exists(path):
    raise ContractError(f"{path}: no such file")
  # pre_buffer (the default) reads far ahead: 5x slower and 3x the memory on a 400 MB file here.
  return pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)


def open_predictions(path: str) -> Source:
  try:
    file = _open_file(path)
  except (pa.ArrowInvalid, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise ContractError(f"{path}: no such file") from None
    raise ContractError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
  schema = file.schema_arrow
  for name in ("example_id", "label"):
    if name not in schema.names:
      raise ContractError(f"{path}: missing column {name!r}")
  score = next((s for s in SCORE_COLUMNS if s in schema.names), None)
  if score is None:
    raise ContractError(f"{path}: needs a 'logits' or 'probs' column")
  kind = schema.field(score).type
  if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) or \
      not pa.types.is_floating(kind.value_type):
    raise ContractError(f"{path}: column {score!r} must be list<float32> or fixed_size_list<float32>, got {kind}")
  if not pa.types.is_integer(schema.field("label").type):
    raise ContractError(f"{path}: column 'label' must be an integer, got {schema.field('label').type}")
  num_rows = file.metadata.num_rows
  if num_rows == 0:
    raise ContractError(f"{path}: no rows")
  source = Source(path, file, score, num_rows, _first_row_width(path, file, score, kind))
  if source.num_classes < 1:
    raise ContractError(f"{path}: row 0: {score!r} has 0 classes")
  for kind_name in ("split", "shift"):
    if kind_name in schema.names:
      source.groups[kind_name] = _codes(file.read(columns=[kind_name]).column(0))
  if "ood" in schema.names:
    column = file.read(columns=["ood"]).column(0)
    if column.null_count:
      raise ContractError(f"{path}: row {_first_null(column)}: 'ood' is null")
    source.ood = column.to_numpy().astype(bool)
  return source


def _first_row_width(path: str, file: pq.ParquetFile, score: str, kind) -> int:
  if pa.types.is_fixed_size_list(kind):
    return kind.list_size
  for batch in file.iter_batches(batch_size=1, columns=[score]):
    first = batch.column(0)[0]
    if not first.is_valid:
      raise ContractError(f"{path}: row 0: {score!r} is null")
    return len(first)
  return 0


def _first_null(column) -> int:
  return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
  """Dictionary codes of a string column; nulls become their own group, named '(null)'."""
  encoded = column.combine_chunks().cast(pa.string()).fill_null("(null)").dictionary_encode()
  return encoded.indices.to_numpy().astype(np.int32), [str(v) for v in encoded.dictionary.to_pylist()]


def chunks(source: Source, columns: list[str], readers: int = READ_THREADS, depth: int = 2):
  """(first row number, record batch) over the file in order, source.rows_per_chunk rows at a time.

  `readers` threads decode row groups g, g + readers, ... with their own file handles (Parquet decoding
  releases the GIL), each at most `depth` batches ahead: decoding overlaps the numpy work on earlier chunks
  and memory stays bounded by readers x depth batches."""
  rows = source.rows_per_chunk
  groups = source.file.metadata.num_row_groups
  readers = max(1, min(readers, groups))
  queues = [queue.Queue(depth) for _ in range(readers)]
  stop, end_of_group = threading.Event(), object()

  def put(q, item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def read(worker: int):
    q = queues[worker]
    try:
      file = source.file if worker == 0 else _open_file(source.path)
      for g in range(worker, groups, readers):
        for batch in file.iter_batches(batch_size=rows, row_groups=[g], columns=columns, use_threads=False):
          if not put(q, batch):
            return
        if not put(q, end_of_group):
          return
    except (pa.ArrowException, OSError) as e:
      put(q, ContractError(f"{source.path}: cannot read row group {g} ({str(e).splitlines()[0]})"))
    except BaseException as e:  # handed to the consumer, which raises it
      put(q, e)

  threads = [threading.Thread(target=read, args=(w,), daemon=True) for w in range(readers)]
  for thread in threads:
    thread.start()
  try:
    row0 = 0
    for g in range(groups):
      while (item := queues[g % readers].get()) is not end_of_group:
        if isinstance(item, BaseException):
          raise item
        yield row0, item
        row0 += item.num_rows
  finally:
    stop.set()


def _example_id(source: Source, row: int) -> str:
  # A fresh handle: the reader thread may still be using source.file.
  ids = _open_file(source.path).read(columns=["example_id"]).column(0)
  return str(ids[row].as_py())


def row_error(source: Source, row: int, message: str) -> ContractError:
  """The error for a bad row, naming it by number and example_id."""
  try:
    which = f"row {row} (example_id {_example_id(source, row)!r})"
  except Exception:  # the message matters more than the id
    which = f"row {row}"
  return ContractError(f"{source.path}: {which}: {message}")


def score_matrix(source: Source, array: pa.Array, row0: int) -> np.ndarray:
  """The scores of one chunk as float32 [n, K]; null rows, null values and rows of another length are
  errors naming the row."""
  n, k, name = len(array), source.num_classes, source.score
  if array.null_count:
    raise row_error(source, row0 + _first_null(array), f"{name!r} is null")
  if pa.types.is_fixed_size_list(array.type):
    values = array.values.slice(array.offset * k, n * k)
  else:
    offsets = np.asarray(array.offsets)
    bad = np.flatnonzero(np.diff(offsets) != k)
    if bad.size:
      row = int(bad[0])
      raise row_error(source, row0 + row, f"{name!r} has {offsets[row + 1] - offsets[row]} classes, "
                                          f"row 0 has {k}")
    values = array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
  if values.null_count:
    raise row_error(source, row0 + _first_null(values) // k, f"{name!r} holds a null value")
  x = values.to_numpy(zero_copy_only=False).reshape(n, k)
  return x if x.dtype == np.float32 else x.astype(np.float32)


def label_vector(source: Source, array: pa.Array, row0: int) -> np.ndarray:
  """The labels of one chunk as int64 [n]; a null label or one outside [0, K) is an error naming the row."""
  if array.null_count:
    raise row_error(source, row0 + _first_null(array), "label is null")
  labels = array.to_numpy(zero_copy_only=False).astype(np.int64)
  bad = np.flatnonzero((labels < 0) | (labels >= source.num_classes))
  if bad.size:
    row = int(bad[0])
    raise row_error(source, row0 + row, f"label {labels[row]} is outside [0, {source.num_classes})")
  return labels
