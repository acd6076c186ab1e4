"""Local paths and gs:// URIs behind one small interface (google-cloud-storage, which honours
STORAGE_EMULATOR_HOST, so tests run against a local emulator; TensorFlow's own gs:// filesystem does not)."""

import os
from typing import IO

_client = None


def is_gcs(path: str) -> bool:
  return path.startswith("gs://")


def _split(uri: str) -> tuple[str, str]:
  bucket, _, name = uri[len("gs://"):].partition("/")
  return bucket, name


def _gcs():
  global _client
  if _client is None:
    from google.cloud import storage
    if os.environ.get("STORAGE_EMULATOR_HOST"):
      from google.auth.credentials import AnonymousCredentials
      _client = storage.Client(project="patchflow-local", credentials=AnonymousCredentials())
    else:
      _client = storage.Client()
  return _client


def open_file(path: str, mode: str = "rb", chunk_size: int | None = None, generation: int | None = None) -> IO:
  """A gs:// object opens as google-cloud-storage's seekable reader/writer, which moves `chunk_size` bytes
  (a multiple of 256 KiB; default 40 MiB) per request; `generation` (reads) pins one version of it."""
  if is_gcs(path):
    bucket, name = _split(path)
    return _gcs().bucket(bucket).blob(name, generation=generation).open(mode, chunk_size=chunk_size)
  return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def upload_file(local_path: str, uri: str) -> None:
  bucket, name = _split(uri)
  _gcs().bucket(bucket).blob(name).upload_from_filename(local_path)


def exists(path: str) -> bool:
  if is_gcs(path):
    bucket, name = _split(path)
    return _gcs().bucket(bucket).blob(name).exists()
  return os.path.exists(path)


def read_bytes(path: str) -> bytes:
  if is_gcs(path):
    bucket, name = _split(path)
    return _gcs().bucket(bucket).blob(name).download_as_bytes()
  with open(path, "rb") as f:
    return f.read()


def generation(path: str) -> int | None:
  """The current version of a gs:// object (None for a local path), to pin reads that must agree."""
  if not is_gcs(path):
    return None
  bucket, name = _split(path)
  blob = _gcs().bucket(bucket).get_blob(name)
  if blob is None:
    raise FileNotFoundError(f"{path}: not found")
  return blob.generation


def read_range(path: str, start: int, length: int, generation: int | None = None) -> bytes:
  """`length` bytes from byte `start` (one ranged GET on gs://, of version `generation` when given: an
  object replaced since is then an error, not other bytes)."""
  if is_gcs(path):
    from google.api_core import exceptions
    bucket, name = _split(path)
    try:
      data = _gcs().bucket(bucket).blob(name, generation=generation).download_as_bytes(
          start=start, end=start + length - 1)
    except exceptions.NotFound:
      raise FileNotFoundError(f"{path}: version {generation} not found; was it replaced while in use?") from None
  else:
    with open(path, "rb") as f:
      f.seek(start)
      data = f.read(length)
  if len(data) != length:
    raise ValueError(f"{path}: wanted {length} bytes at byte {start}, the file holds {len(data)}")
  return data


def join(base: str, *parts: str) -> str:
  return "/".join([base.rstrip("/"), *parts]) if is_gcs(base) else os.path.join(base, *parts)


def gcs_listing(uri: str) -> list[tuple[str, str]]:
  """(path relative to uri, content hash from GCS metadata) for every object under uri, sorted."""
  bucket, name = _split(uri)
  prefix = name.rstrip("/") + "/" if name else ""
  blobs = _gcs().bucket(bucket).list_blobs(prefix=prefix)
  exact = _gcs().bucket(bucket).get_blob(name) if name else None
  listing = [(b.name[len(prefix):], b.crc32c or b.md5_hash or "") for b in blobs]
  if exact is not None and not listing:
    listing = [(name.rsplit("/", 1)[-1], exact.crc32c or exact.md5_hash or "")]
  return sorted(listing)
