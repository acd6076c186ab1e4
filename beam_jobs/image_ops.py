"""Pure image functions of the shard builder: open, decode to RGB, fit to a patch grid, resize, patchify."""

import functools
import io
import math
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height on display.
_RESAMPLE = Image.Resampling.BILINEAR  # of every resize to a patch grid


def open_image(data: bytes) -> Image.Image:
  """Opens encoded image bytes lazily (header only). Raises PIL.UnidentifiedImageError for a non-image."""
  return Image.open(io.BytesIO(data))


def _orientation(image: Image.Image) -> int:
  try:
    return int(image.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the image.
    return 1


def oriented_size(image: Image.Image) -> tuple[int, int]:
  """(height, width) as displayed, i.e. after the EXIF orientation is applied; reads the header only."""
  width, height = image.size
  return (width, height) if _orientation(image) in _TRANSPOSED_ORIENTATIONS else (height, width)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_ORIENTATION_KEYWORDS = (b"XML:com.adobe.xmp\0", b"Raw profile type exif\0", b"exif\0")


def _png_exif_if_whole(data: bytes) -> bytes | None:
  """Walks a PNG's chunks, checking each CRC, up to IEND. Returns the eXIf payload (b"" when there is none)
  if the file is whole and every CRC is right, else None (also for a text chunk that may carry the
  orientation). Costs a CRC pass over the bytes, no inflating."""
  pos, exif = len(_PNG_SIGNATURE), b""
  while pos + 12 <= len(data):
    length, kind = struct.unpack_from(">I4s", data, pos)
    end = pos + 8 + length
    if end + 4 > len(data) or zlib.crc32(memoryview(data)[pos + 4:end]) != struct.unpack_from(">I", data, end)[0]:
      return None
    if kind == b"eXIf":
      exif = data[pos + 8:end]
    elif kind in (b"tEXt", b"zTXt", b"iTXt") and data.startswith(_PNG_ORIENTATION_KEYWORDS, pos + 8):
      return None  # PIL may take the orientation from XMP or a raw EXIF text profile: let it decide
    elif kind == b"IEND":
      return exif
    pos = end + 4
  return None


# The JPEG marker walk. Planning sizes every image, and a plain JPEG's size and Exif block sit in its marker
# segments: walking them costs a quarter of PIL's parser and halves the cost of planning a JPEG
# (benchmarks/plan_check.py, 256x256: `plan_example` 0.016 ms per image with the walk, 0.033 ms with PIL
# reading the header). The walk answers only for files that keep the rules below (ITU-T T.81 Annex B, and the
# JFIF, Adobe, ICC and Exif conventions for APPn segments); for anything else it steps aside and PIL decides,
# so it changes what planning costs, never what it finds.
# Markers (T.81 Table B.1): the frame headers SOF0-3, 5-7, 9-11 and 13-15 (C4, C8 and CC are DHT, JPG and DAC),
# and the table and miscellaneous segments that may come before the first scan (B.2.4): DHT, DAC, DRI, COM,
# APP0-15 and DQT, whose tables the walk checks against the segment length (B.2.4.1).
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_JPEG_TABLES_AND_MISC = frozenset((0xC4, 0xCC, 0xDD, 0xFE, *range(0xE0, 0xF0)))
_JPEG_DQT, _JPEG_SOS, _JPEG_EOI = 0xDB, 0xDA, b"\xff\xd9"
_JPEG_EXIF, _JPEG_XMP, _JPEG_MPF = b"Exif\0\0", b"http://ns.adobe.com/xap/1.0/\0", b"MPF\0"
# APPn segments of a fixed layout: the bytes after the length hold at least the identifier and these fields,
# else the segment is malformed. JFIF 1.02: "JFIF\0", version, units, x and y density, thumbnail width and
# height (14 bytes); Adobe (Technical Note 5116): "Adobe", version, flags0, flags1, transform (12); ICC.1
# Annex B: "ICC_PROFILE\0", chunk number, chunk count (14). Matched on the identifier's letters, so one that
# lacks its terminator counts too.
_JPEG_APP_FIXED_BYTES = {(0xE0, b"JFIF"): 14, (0xEE, b"Adobe"): 12, (0xE2, b"ICC_PROFILE"): 14}
# The component counts of the JFIF (1: grayscale, 3: YCbCr) and Adobe (4: CMYK or YCCK) colour conventions.
_JPEG_COMPONENTS = (1, 3, 4)


def _jpeg_header(data: bytes) -> tuple[int, int, bytes] | None:
  """(height, width, Exif payload or b"") of a JPEG from its marker segments up to its first scan, or None for
  a file outside the rules above, and the caller then asks PIL: a marker not listed there, bytes between
  segments, a second frame header, a sample precision other than 8 bits or a component count outside the
  JFIF and Adobe conventions, a height defined later (DNL), a malformed DQT or fixed-layout APPn segment,
  orientation metadata the walk does not read (an XMP packet; more than one Exif block, where the Exif
  standard has one), a multi-picture file (MPF), or more pixels than PIL's public decompression-bomb limit
  (`Image.MAX_IMAGE_PIXELS`: PIL warns or refuses above it)."""
  if not data.startswith(b"\xff\xd8"):
    return None
  pos, end, size, exif = 2, len(data), None, None
  while pos + 4 <= end:
    if data[pos] != 0xFF:
      return None
    marker = data[pos + 1]
    if marker == 0xFF:  # a fill byte before the marker (B.1.1.2)
      pos += 1
      continue
    if marker == _JPEG_SOS:
      return None if size is None else (*size, exif or b"")
    if marker not in _JPEG_SOF and marker not in _JPEG_TABLES_AND_MISC and marker != _JPEG_DQT:
      return None
    length = int.from_bytes(data[pos + 2:pos + 4], "big")
    body, segment_end = pos + 4, pos + 2 + length
    if length < 2 or segment_end > end:
      return None
    if marker in _JPEG_SOF:
      if size is not None or length < 8:
        return None
      bits, height, width, components = struct.unpack_from(">BHHB", data, body)
      if length != 8 + 3 * components or bits != 8 or components not in _JPEG_COMPONENTS or not height or not width:
        return None
      if Image.MAX_IMAGE_PIXELS and height * width > Image.MAX_IMAGE_PIXELS:
        return None
      size = (height, width)
    elif marker == _JPEG_DQT:
      table = body
      while table < segment_end:  # each table: precision (0: 8-bit, 1: 16-bit) and id (0-3), then 64 values
        precision, table_id = divmod(data[table], 16)
        if precision > 1 or table_id > 3:
          return None
        table += 1 + 64 * (1 + precision)
      if table != segment_end:
        return None
    elif marker == 0xE1:
      if data.startswith(_JPEG_XMP, body):
        return None
      if data.startswith(_JPEG_EXIF, body):
        if exif is not None:
          return None
        exif = data[body:segment_end]
    elif marker == 0xE2 and data.startswith(_JPEG_MPF, body):
      return None
    else:
      for (app, identifier), fixed_bytes in _JPEG_APP_FIXED_BYTES.items():
        if marker == app and data.startswith(identifier, body) and length - 2 < fixed_bytes:
          return None
    pos = segment_end
  return None


def _looks_whole(image: Image.Image, data: bytes) -> bool:
  """A cheap test that a file is not cut short, from its trailer or its own size field; False means "decode
  to find out" (a JPEG with bytes after its end marker, an unknown format), not "broken"."""
  fmt = image.format
  if fmt == "JPEG":
    return data.endswith(_JPEG_EOI)  # the end marker; entropy-coded data never ends in it
  if fmt == "WEBP":
    return True  # its RIFF size was checked before opening
  if fmt == "BMP":
    declared = struct.unpack_from("<I", data, 2)[0]  # 0 from some writers: unknown
    return declared > 0 and len(data) >= declared
  # GIF is decoded: its trailer byte (0x3B) also occurs inside image data, so a cut file can end in it.
  return False


def whole_image_size(data: bytes) -> tuple[int, int]:
  """(height, width) as displayed, after making sure the file is whole, so that a truncated or corrupt file
  is found while planning, not when its shard is written. Cheap for the common formats: a JPEG, WebP or BMP
  is whole when its trailer or size field says so (a plain JPEG's size and EXIF come from its marker
  segments, without PIL), a PNG when every chunk's CRC is right up to IEND (its orientation then comes from
  the eXIf chunk, without inflating the pixels). Otherwise (other formats, bytes
  after a JPEG's end marker, a PNG without IEND) the pixels are decoded once, a JPEG at 1/8 scale, and PIL's
  error, if any, is raised: "image file is truncated" for a file cut short."""
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    riff_size = 8 + struct.unpack_from("<I", data, 4)[0]
    if len(data) < riff_size:  # libwebp would only say "could not create decoder object"
      raise OSError(f"image file is truncated ({len(data)} of {riff_size} bytes)")
  if data.endswith(_JPEG_EOI) and (header := _jpeg_header(data)) is not None:  # the common case, no PIL
    height, width, exif = header
    orientation = _exif_orientation(exif) if exif else 1
    return (width, height) if orientation in _TRANSPOSED_ORIENTATIONS else (height, width)
  with open_image(data) as image:
    if image.format == "PNG" and data.startswith(_PNG_SIGNATURE):
      exif = _png_exif_if_whole(data)
      if exif is not None:
        width, height = image.size
        orientation = _exif_orientation(exif) if exif else 1
        return (width, height) if orientation in _TRANSPOSED_ORIENTATIONS else (height, width)
    whole = _looks_whole(image, data)
    if not whole and image.format != "JPEG":
      image.load()  # before reading the orientation, which would swallow a PNG's decoding error
    size = oriented_size(image)
    if not whole and image.format == "JPEG":
      image.draft(image.mode, (1, 1))  # the smallest DCT scale (after the size is read): every byte is still
      image.load()                     # entropy-decoded, so a cut is found
    return size


def _exif_orientation(exif: bytes) -> int:
  try:
    parsed = Image.Exif()
    parsed.load(exif)
    return int(parsed.get(_EXIF_ORIENTATION, 1))
  except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the image.
    return 1


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB. 16/32-bit integer: the high byte is kept so the full range maps onto 0..255; float:
  [0, 1] is scaled to 0..255 (values above 1 are taken as 0..255 already); alpha is dropped (as TF's
  decode_image with channels=3 does); palette, grayscale, bilevel, CMYK and YCbCr convert with PIL."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode.startswith("I;16") or mode == "I":
    pixels = np.asarray(image, dtype=np.int64)
    shift = 8 if mode.startswith("I;16") or pixels.max(initial=0) > 255 else 0
    return Image.fromarray((pixels >> shift).clip(0, 255).astype(np.uint8), "L").convert("RGB")
  if mode == "F":
    pixels = np.asarray(image, dtype=np.float64)
    scale = 255.0 if pixels.max(initial=0.0) <= 1.0 else 1.0
    return Image.fromarray(np.nan_to_num(pixels * scale).clip(0, 255).round().astype(np.uint8), "L").convert("RGB")
  if mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB.
  return image.convert("RGB")


def _displayed_rgb(image: Image.Image, target_hw: tuple[int, int] | None) -> Image.Image:
  """The opened image decoded, turned as displayed (EXIF orientation) and in RGB; a JPEG at the smallest DCT
  scale (1/2, 1/4, 1/8) still at least `target_hw` (as displayed), which makes huge JPEGs several times cheaper."""
  if target_hw is not None and image.format == "JPEG":
    th, tw = target_hw
    if _orientation(image) in _TRANSPOSED_ORIENTATIONS:
      th, tw = tw, th
    image.draft("RGB", (tw, th))
  image.load()  # first: a PNG's getexif() loads the pixels itself, and _orientation would swallow its error
  if _orientation(image) != 1:  # exif_transpose copies the image even when there is nothing to do.
    image = ImageOps.exif_transpose(image)
  return to_rgb(image)


def decode_rgb(data: bytes, target_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Decodes any PIL-readable image to uint8 RGB [H, W, 3], applying EXIF orientation.

  With `target_hw` (the size it will be resized to, as displayed), a JPEG is decoded at the smallest DCT
  scale that is still at least that big. Raises on a non-image, a truncated or a corrupt file.
  """
  with open_image(data) as image:
    return np.asarray(_displayed_rgb(image, target_hw), dtype=np.uint8)


def decode_resized(data: bytes, height: int, width: int) -> np.ndarray:
  """resize_to_grid(decode_rgb(data, (height, width)), ...) without its copies: the resize runs on PIL's own
  decoded image, so the pixels leave PIL once, already at uint8 RGB [height, width, 3]."""
  with open_image(data) as image:
    rgb = _displayed_rgb(image, (height, width))
    if rgb.size != (width, height):
      rgb = rgb.resize((width, height), _RESAMPLE)
    return np.asarray(rgb, dtype=np.uint8)


def _largest_grid(height: int, width: int, max_patches: int) -> tuple[int, int]:
  """The grid (rows, cols) with the most patches, at most `max_patches`, that is within one patch of an exact
  aspect-preserving scaling of height x width: some scale s has |rows - s*height| < 1 and |cols - s*width| < 1
  (sizes in patches). Ties go to the grid closest to the true aspect ratio, then to fewer rows."""

  def most_across(along: int, a: int, b: int) -> int:
    # The most patches across (side b) for `along` patches on side a:
    # across*a < (along+1)*b + a  and  (across+1)*a > (along-1)*b, in integers; 0 when none fits.
    across = min(max_patches // along, ((along + 1) * b + a - 1) // a)
    return across if across >= 1 and (across + 1) * a > (along - 1) * b else 0

  candidates = []
  # The best grid lies near the exact solution rows*cols = max_patches, except for extreme aspect ratios,
  # where the thin side may be very few patches: searching around both sides' exact values covers both.
  for a, b, transpose in ((height, width, False), (width, height, True)):
    exact = math.sqrt(max_patches * a / b)
    for along in range(max(1, min(math.floor(exact), max_patches) - 3), min(max_patches, math.ceil(exact) + 3) + 1):
      across = most_across(along, a, b)
      if across:
        candidates.append((across, along) if transpose else (along, across))
  if not candidates:  # unreachable for positive sizes; a bug shows as a small grid, not a crash.
    return 1, 1
  return min(candidates, key=lambda rc: (-rc[0] * rc[1], abs(math.log(rc[1] * height / (rc[0] * width))), rc[0]))


def fit_patch_grid(height: int, width: int, patch_size: int, max_patches: int,
                   resample_to_budget: bool = False) -> tuple[int, int]:
  """Grid (rows, cols) of the resized image.

  By default the native size rounded to whole patches when it fits `max_patches` (tiny images go up to one
  patch), else the largest grid within the budget whose aspect ratio is within one patch of the source's.
  With `resample_to_budget` (NaViT resolution sampling) the image always takes the largest such grid, up- or
  down-scaled.
  """
  if height < 1 or width < 1 or max_patches < 1:
    raise ValueError(f"image {height}x{width} with a budget of {max_patches} patches")
  if not resample_to_budget:
    rows = max(1, round(height / patch_size))
    cols = max(1, round(width / patch_size))
    if rows * cols <= max_patches:
      return rows, cols
  return _largest_grid(height, width, max_patches)


def resize_to_grid(pixels: np.ndarray, rows: int, cols: int, patch_size: int) -> np.ndarray:
  height, width = rows * patch_size, cols * patch_size
  if pixels.shape[:2] == (height, width):
    return pixels
  image = Image.fromarray(pixels, "RGB").resize((width, height), _RESAMPLE)
  return np.asarray(image, dtype=np.uint8)


def patchify(pixels: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """[rows*p, cols*p, 3] -> patches uint8 [rows*cols, p*p*3] (row, column, channel order inside each
  patch; patches in raster order) and their grid positions int32 [rows*cols, 2]."""
  height, width, channels = pixels.shape
  rows, cols = height // patch_size, width // patch_size
  out = np.empty((rows * cols, patch_size * patch_size * channels), np.uint8)
  patchify_into(pixels, patch_size, out)
  return out, patch_positions(rows, cols).copy()


def patchify_into(pixels: np.ndarray, patch_size: int, out: np.ndarray) -> None:
  """Writes patchify's patches of `pixels` into `out` (C-contiguous, [rows*cols, p*p*3]) with one copy: the
  shard writer passes rows of the sequence's own patch buffer, so no patch is copied twice."""
  height, width, channels = pixels.shape
  rows, cols, p = height // patch_size, width // patch_size, patch_size
  np.copyto(out.reshape(rows, cols, p, p * channels),
            pixels.reshape(rows, p, cols, p * channels).transpose(0, 2, 1, 3))


@functools.lru_cache(maxsize=4096)
def patch_positions(rows: int, cols: int) -> np.ndarray:
  """(row, column) of each patch of a rows x cols grid in raster order, int32 [rows*cols, 2] (read-only, shared)."""
  yy, xx = np.meshgrid(np.arange(rows, dtype=np.int32), np.arange(cols, dtype=np.int32), indexing="ij")
  out = np.stack([yy.reshape(-1), xx.reshape(-1)], axis=1)
  out.flags.writeable = False
  return out


def unpatchify(patches: np.ndarray, rows: int, cols: int, patch_size: int) -> np.ndarray:
  """Inverse of patchify: patches [rows*cols, p*p*3] -> image [rows*p, cols*p, 3]."""
  grid = patches.reshape(rows, cols, patch_size, patch_size, 3).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * patch_size, cols * patch_size, 3)


def byte_tokens(text: str) -> np.ndarray:
  """Byte-level tokenizer: UTF-8 bytes shifted by one, so 0 stays free for padding."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + 1
