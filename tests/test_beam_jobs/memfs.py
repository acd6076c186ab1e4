"""A dict-backed Beam FileSystem for `memfs://` paths, with GCS's object semantics (no directories, an object
appears when its writer closes, rename is copy + delete). Importing this module registers it; a job that reads
and writes `memfs://` paths proves that it goes through FileSystems only, as gs:// needs."""

import io

from apache_beam.io.filesystem import BeamIOError, CompressedFile, CompressionTypes, FileMetadata, FileSystem

OBJECTS: dict[str, bytes] = {}


class _Writer(io.BytesIO):
  def __init__(self, path):
    super().__init__()
    self._path = path

  def close(self):
    if not self.closed:
      OBJECTS[self._path] = self.getvalue()
    super().close()


def _wrap(raw, path, compression_type):
  compression_type = FileSystem._get_compression_type(path, compression_type)
  return raw if compression_type == CompressionTypes.UNCOMPRESSED else CompressedFile(raw, compression_type)


class MemFileSystem(FileSystem):
  @classmethod
  def scheme(cls):
    return "memfs"

  def join(self, basepath, *paths):
    return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

  def split(self, path):
    head, _, tail = path.rpartition("/")
    return head, tail

  def mkdirs(self, path):
    pass

  def has_dirs(self):
    return False

  def _list(self, prefix):
    for path in sorted(OBJECTS):
      if path.startswith(prefix):
        yield FileMetadata(path, len(OBJECTS[path]), 0.0)

  def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
    return _wrap(_Writer(path), path, compression_type)

  def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
    if path not in OBJECTS:
      raise BeamIOError("Open failed", {path: FileNotFoundError(path)})
    return _wrap(io.BytesIO(OBJECTS[path]), path, compression_type)

  def copy(self, source_file_names, destination_file_names):
    for s, d in zip(source_file_names, destination_file_names):
      OBJECTS[d] = OBJECTS[s]

  def rename(self, source_file_names, destination_file_names):
    self.copy(source_file_names, destination_file_names)
    self.delete(source_file_names)

  def exists(self, path):
    return path in OBJECTS

  def size(self, path):
    return len(OBJECTS[path])

  def last_updated(self, path):
    return 0.0

  def checksum(self, path):
    return str(hash(OBJECTS[path]))

  def metadata(self, path):
    if path not in OBJECTS:
      raise BeamIOError(f"Path does not exist: {path}")
    return FileMetadata(path, len(OBJECTS[path]), 0.0)

  def delete(self, paths):
    for path in paths:
      OBJECTS.pop(path, None)

  def report_lineage(self, path, level, lineage=None):
    pass
