"""The CRC32C of TFRecord framing (a length, its masked CRC, the data, the data's masked CRC): the writer in
beam_jobs and the reader in trainers check the same numbers."""

try:
  import google_crc32c  # C implementation; a dependency of google-cloud-storage.

  def crc32c(data) -> int:
    return google_crc32c.value(data)

  def crc32c_extend(crc: int, data) -> int:
    return google_crc32c.extend(crc, data)
except ImportError:  # pragma: no cover - Beam's fallback (crcmod, slower).
  from apache_beam.io.tfrecordio import _default_crc32c_fn as crc32c

  def crc32c_extend(crc: int, data) -> int:
    import crcmod.predefined
    fn = crcmod.predefined.mkPredefinedCrcFun("crc-32c")
    return fn(bytes(data), crc)

_MASK_DELTA = 0xA282EAD8


def mask_crc(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data) -> int:
  return mask_crc(crc32c(data))
