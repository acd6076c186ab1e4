import io
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from beam_jobs import image_ops


@pytest.mark.parametrize("h, w, budget, expected", [
    (64, 32, 64, (4, 2)),        # native size fits: kept
    (40, 24, 64, (2, 2)),        # rounded to whole patches (2.5 -> 2, 1.5 -> 2)
    (5, 5, 64, (1, 1)),          # tiny: at least one patch
    (5, 5000, 64, (1, 64)),      # tiny and thin: one row
    (512, 512, 64, (8, 8)),      # huge: scaled down to the budget
    (512, 512, 60, (7, 8)),      # ... the largest grid within one patch of the aspect ratio
    (160, 480, 64, (5, 12)),     # 1:3 -> 5x12 = 60 patches (4x13 = 52 is further from the budget)
    (16, 4000, 64, (1, 64)),     # extreme aspect clamps to one row
    (4000, 16, 64, (64, 1)),     # ... or one column
])
def test_fit_patch_grid(h, w, budget, expected):
  rows, cols = image_ops.fit_patch_grid(h, w, 16, budget)
  assert (rows, cols) == expected
  assert rows * cols <= budget


def _within_one_patch(rows, cols, h, w):
  """Some scale s has |rows - s*h| < 1 and |cols - s*w| < 1 (open intervals of s intersect)."""
  return max((rows - 1) / h, (cols - 1) / w) < min((rows + 1) / h, (cols + 1) / w)


def _brute_force_largest(h, w, budget):
  best = None
  for r in range(1, budget + 1):
    for c in range(1, budget // r + 1):
      if _within_one_patch(r, c, h, w):
        key = (-r * c, abs(math.log(c * h / (r * w))), r)
        best = min(best, (key, (r, c))) if best else (key, (r, c))
  return best[1]


def test_downscaled_grid_is_the_largest_that_keeps_the_aspect_ratio_within_one_patch():
  rng = np.random.default_rng(0)
  for _ in range(400):
    h, w = (int(v) for v in rng.integers(8, 3000, size=2))
    budget = int(rng.integers(1, 200))
    rows, cols = image_ops.fit_patch_grid(h, w, 16, budget, resample_to_budget=True)
    assert 1 <= rows * cols <= budget
    assert _within_one_patch(rows, cols, h / 16, w / 16)
    assert (rows, cols) == _brute_force_largest(h, w, budget)


def test_native_grid_is_kept_when_it_fits_and_aspect_is_preserved_otherwise():
  rng = np.random.default_rng(1)
  for _ in range(500):
    h, w = (int(v) for v in rng.integers(8, 2000, size=2))
    rows, cols = image_ops.fit_patch_grid(h, w, 16, 64)
    native = (max(1, round(h / 16)), max(1, round(w / 16)))
    if native[0] * native[1] <= 64:
      assert (rows, cols) == native
    else:
      assert rows * cols <= 64 and _within_one_patch(rows, cols, h / 16, w / 16)


def test_resample_to_budget_scales_small_images_up():
  assert image_ops.fit_patch_grid(32, 32, 16, 64, resample_to_budget=True) == (8, 8)
  assert image_ops.fit_patch_grid(32, 64, 16, 50, resample_to_budget=True) == (5, 10)


def test_patchify_unpatchify_round_trip_and_positions():
  pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
  patches, yx = image_ops.patchify(pixels, 16)
  assert patches.shape == (6, 16 * 16 * 3) and yx.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
  # Patch (1, 2) holds rows 16..31, cols 32..47, flattened row, column, channel.
  np.testing.assert_array_equal(patches[5], pixels[16:32, 32:48].reshape(-1))
  np.testing.assert_array_equal(image_ops.unpatchify(patches, 2, 3, 16), pixels)


def _encode(image, fmt="PNG", **kw):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kw)
  return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt, value, expected", [
    ("L", "PNG", 100, (100, 100, 100)),
    ("LA", "PNG", (100, 7), (100, 100, 100)),
    ("1", "PNG", 1, (255, 255, 255)),
    ("RGBA", "PNG", (10, 20, 30, 0), (10, 20, 30)),       # alpha dropped, as TF's decode_image(channels=3)
    ("RGB", "BMP", (10, 20, 30), (10, 20, 30)),
    ("RGB", "TIFF", (10, 20, 30), (10, 20, 30)),
    ("RGB", "WEBP", (10, 20, 30), None),                 # lossy: shape only
    ("RGB", "GIF", (10, 20, 30), None),                  # palette quantised: shape only
    ("CMYK", "JPEG", (0, 255, 255, 0), None),            # red in CMYK
    ("I;16", "PNG", 0xABCD, (0xAB, 0xAB, 0xAB)),         # 16-bit: high byte
    ("I", "TIFF", 40000, (156, 156, 156)),               # 32-bit int holding 16-bit data: high byte
    ("F", "TIFF", 0.5, (128, 128, 128)),                 # float in [0, 1]
    ("YCbCr", "JPEG", (128, 128, 128), None),
])
def test_decode_converts_modes_and_formats_to_rgb(mode, fmt, value, expected):
  image = Image.new(mode, (7, 5), value)
  out = image_ops.decode_rgb(_encode(image, fmt))
  assert out.shape == (5, 7, 3) and out.dtype == np.uint8
  if expected is not None:
    assert tuple(out[2, 3]) == expected
  if mode == "CMYK":
    r, g, b = out[2, 3].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_decode_palette_with_transparency():
  image = Image.new("P", (6, 4), 1)
  image.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
  image.info["transparency"] = 0
  out = image_ops.decode_rgb(_encode(image, "PNG"))
  assert tuple(out[0, 0]) == (200, 10, 20)


def test_decode_takes_the_first_frame_of_an_animation():
  frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
  buffer = io.BytesIO()
  frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
  out = image_ops.decode_rgb(buffer.getvalue())
  assert out.shape == (4, 6, 3) and out[0, 0, 0] > 200


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_the_header_size_agrees(orientation):
  pixels = np.zeros((16, 32, 3), np.uint8)
  pixels[:8, :8] = 255  # a white top-left corner, to see where it goes
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = _encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
  out = image_ops.decode_rgb(data)
  expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
  np.testing.assert_array_equal(out, expected)
  assert out.shape[:2] == ((32, 16) if orientation >= 5 else (16, 32))
  with image_ops.open_image(data) as image:
    assert image_ops.oriented_size(image) == out.shape[:2]


def test_huge_jpeg_is_decoded_at_a_reduced_scale_that_still_covers_the_target():
  rng = np.random.default_rng(0)
  base = np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((64, 64, 1))).astype(np.uint8)  # 1024 x 1024
  data = _encode(Image.fromarray(base), "JPEG", quality=95)
  small = image_ops.decode_rgb(data, target_hw=(128, 128))
  full = image_ops.decode_rgb(data)
  assert full.shape == (1024, 1024, 3) and small.shape == (128, 128, 3)
  a = image_ops.resize_to_grid(small, 8, 8, 16).astype(int)
  b = image_ops.resize_to_grid(full, 8, 8, 16).astype(int)
  assert np.abs(a - b).mean() < 8  # DCT-domain scaling vs a full decode: close, not equal
  assert image_ops.decode_rgb(data, target_hw=(300, 300)).shape == (512, 512, 3)  # 1/2 still covers 300


@pytest.mark.parametrize("fmt, mode, orientation, size, target", [
    ("JPEG", "RGB", 6, (300, 200), (64, 96)),     # turned, DCT-scaled to 1/2, then resized
    ("JPEG", "RGB", 8, (300, 200), (160, 96)),    # turned the other way, resized
    ("JPEG", "RGB", 1, (64, 48), (48, 64)),       # already the target size: no resize
    ("JPEG", "CMYK", 1, (90, 60), (48, 80)),      # converted by PIL, then resized
    ("PNG", "P", 1, (50, 30), (32, 48)),          # palette, scaled up
    ("PNG", "PA", 1, (50, 30), (32, 48)),         # palette with a transparent entry: through RGBA
    ("PNG", "I;16", 1, (40, 70), (64, 32)),       # 16-bit, through an array conversion
])
def test_decode_resized_is_decode_then_resize_to_grid(fmt, mode, orientation, size, target):
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
  if mode == "I;16":  # the full 16-bit range, so the high byte that is kept varies
    image = Image.fromarray(rng.integers(0, 65536, (size[1], size[0])).astype(np.uint16))
  elif mode in ("P", "PA"):
    image = image.quantize(16)
    if mode == "PA":
      image.info["transparency"] = 3
  elif mode == "CMYK":
    image = image.convert("CMYK")
  kwargs = {}
  if orientation != 1:
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs["exif"] = exif.tobytes()
  data = _encode(image, fmt, **kwargs)
  height, width = target
  expected = image_ops.resize_to_grid(image_ops.decode_rgb(data, target), height // 16, width // 16, 16)
  out = image_ops.decode_resized(data, height, width)
  assert out.shape == (height, width, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"])
def test_truncated_files_pass_the_header_but_not_the_whole_file_check(fmt):
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(pixels), fmt)
  assert image_ops.whole_image_size(data) == (64, 64)
  cut = data[:len(data) // 2]
  if fmt != "WEBP":  # libwebp reads no header of a cut file
    with image_ops.open_image(cut) as image:
      assert image.size == (64, 64)  # the header alone reads
    with pytest.raises(OSError, match="truncated"):
      image_ops.decode_rgb(cut)
  with pytest.raises(OSError, match="truncated"):
    image_ops.whole_image_size(cut)


def test_cut_files_that_fool_a_trailer_or_size_check_are_still_found():
  pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  gif = _encode(Image.fromarray(pixels), "GIF")
  # A cut that happens to end in the GIF trailer byte 0x3B.
  cut_at = next(i for i in range(len(gif) // 2, len(gif) - 1) if gif[i] == 0x3B) + 1
  with pytest.raises(OSError):
    image_ops.whole_image_size(gif[:cut_at])
  bmp = bytearray(_encode(Image.fromarray(pixels), "BMP"))
  bmp[2:6] = bytes(4)  # bfSize 0, as some writers leave it
  assert image_ops.whole_image_size(bytes(bmp)) == (64, 64)
  with pytest.raises(OSError, match="truncated"):
    image_ops.whole_image_size(bytes(bmp[:len(bmp) // 2]))


def test_whole_file_check_accepts_trailing_bytes_and_reads_png_orientation_without_decoding():
  pixels = np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8)
  jpeg = _encode(Image.fromarray(pixels), "JPEG")
  assert image_ops.whole_image_size(jpeg + b"appended data") == (16, 32)  # decoded at 1/8 scale to decide
  exif = Image.Exif()
  exif[0x0112] = 6
  png = _encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
  assert image_ops.whole_image_size(png) == (32, 16) == image_ops.decode_rgb(png).shape[:2]
  corrupt = bytearray(_encode(Image.fromarray(pixels), "PNG"))
  corrupt[60:70] = bytes(10)  # inside the pixel data: a CRC fails, then decoding does
  with pytest.raises(OSError):
    image_ops.whole_image_size(bytes(corrupt))
  no_iend = _encode(Image.fromarray(pixels), "PNG")[:-12]  # every pixel there, only the end chunk missing
  assert image_ops.whole_image_size(no_iend) == (16, 32)


def test_decode_rejects_non_image():
  with pytest.raises(Exception):
    image_ops.decode_rgb(b"definitely not an image")


def test_byte_tokens_keep_zero_for_padding():
  assert image_ops.byte_tokens("a\u00e9").tolist() == [98, 196, 170]


def _jpeg_variants():
  """JPEGs that differ in what the marker walk must get right: modes, progressive coding, restart intervals,
  comments and EXIF orientation (before or after other segments), an XMP packet, a fill byte."""
  rng = np.random.default_rng(3)
  out = []
  for i, (mode, h, w) in enumerate([("RGB", 23, 41), ("L", 40, 9), ("CMYK", 17, 17), ("RGB", 300, 5)]):
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 1 + i * 2 + (i % 2)  # 1, 4, 5, 8
    out.append((f"{mode}-plain", _encode(image, "JPEG")))
    out.append((f"{mode}-progressive-restarts-comment", _encode(image, "JPEG", progressive=True, restart_marker_blocks=2,
                                                                 comment=b"ignore me")))
    out.append((f"{mode}-exif{exif[0x0112]}", _encode(image, "JPEG", exif=exif.tobytes())))
  rotated_in_xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
  out.append(("xmp-orientation", _encode(Image.new("RGB", (30, 10)), "JPEG", xmp=rotated_in_xmp)))
  plain = _encode(Image.new("RGB", (30, 10)), "JPEG")
  out.append(("fill-byte", plain[:2] + b"\xff" + plain[2:]))
  return out


@pytest.mark.parametrize("name, data", _jpeg_variants(), ids=[n for n, _ in _jpeg_variants()])
def test_jpeg_size_from_the_markers_agrees_with_pil_and_the_decoder(name, data):
  with image_ops.open_image(data) as image:
    expected = image_ops.oriented_size(image)
  assert image_ops.whole_image_size(data) == expected == image_ops.decode_rgb(data).shape[:2]
  header = image_ops._jpeg_header(data)
  if name == "xmp-orientation":
    assert header is None and expected == (30, 10)  # PIL reads the orientation from XMP; so do we, through it
  else:
    assert header is not None and header[:2] == Image.open(io.BytesIO(data)).size[::-1]


def test_plain_jpeg_is_sized_without_pil(monkeypatch):
  data = _encode(Image.new("RGB", (30, 10)), "JPEG")
  monkeypatch.setattr(image_ops, "open_image", lambda _: pytest.fail("PIL opened a plain whole JPEG"))
  assert image_ops.whole_image_size(data) == (10, 30)
  # Cut short: no end marker, so PIL decodes to decide (and finds the cut).
  monkeypatch.undo()
  with pytest.raises(OSError, match="(?i)truncat"):
    image_ops.whole_image_size(data[:len(data) - 40])


def test_jpeg_marker_walk_gives_up_on_bytes_that_are_not_a_frame_header():
  data = _encode(Image.new("RGB", (30, 10)), "JPEG")
  assert image_ops._jpeg_header(data) == (10, 30, b"")
  sof = data.index(b"\xff\xc0")
  assert image_ops._jpeg_header(data[:sof]) is None  # ends before the frame header
  broken = bytearray(data)
  broken[sof + 5:sof + 7] = bytes(2)  # height 0 (defined later by a DNL marker): PIL's business
  assert image_ops._jpeg_header(bytes(broken)) is None
  broken = bytearray(data)
  broken[4:6] = b"\xff\xff"  # a segment length running past the end
  assert image_ops._jpeg_header(bytes(broken)) is None
  assert image_ops._jpeg_header(b"\xff\xd8\xff\xda\x00\x02") is None  # a scan before any frame header


def test_png_orientation_in_xmp_is_left_to_pil():
  from PIL import PngImagePlugin
  info = PngImagePlugin.PngInfo()
  info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
                '22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
                '</rdf:RDF></x:xmpmeta>')
  data = _encode(Image.new("RGB", (30, 10)), "PNG", pnginfo=info)
  assert image_ops.whole_image_size(data) == (30, 10) == image_ops.decode_rgb(data).shape[:2]


def _segment(marker: int, payload: bytes) -> bytes:
  return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload


def _with_segment(jpeg: bytes, segment: bytes, before: bytes = b"\xff\xda") -> bytes:
  at = jpeg.index(before)
  return jpeg[:at] + segment + jpeg[at:]


def _pil_outcome(data):
  try:
    with image_ops.open_image(data) as image:
      return image_ops.oriented_size(image)
  except Exception as e:  # noqa: BLE001
    return type(e).__name__


def _rotated_exif():
  exif = Image.Exif()
  exif[0x0112] = 6
  return b"Exif\0\0" + exif.tobytes()


@pytest.mark.parametrize("case", ["exif-after-frame-header", "second-exif-block", "reserved-marker", "short-dqt",
                                  "short-jfif", "mpf-index", "decompression-bomb", "second-frame-header"])
def test_jpeg_marker_walk_leaves_to_pil_whatever_pil_reads_differently_or_refuses(case):
  """Each file here is whole (it ends in EOI); the marker walk must give PIL's answer or step aside."""
  plain = _encode(Image.new("RGB", (30, 10)), "JPEG")
  data = {
      "exif-after-frame-header": _with_segment(plain, _segment(0xE1, _rotated_exif())),  # between SOF and SOS
      "second-exif-block": _with_segment(plain, _segment(0xE1, b"Exif\0\0") + _segment(0xE1, _rotated_exif()),
                                         before=b"\xff\xdb"),  # PIL joins the two
      "reserved-marker": _with_segment(plain, _segment(0x02, b"xx")),
      "short-dqt": _with_segment(plain, _segment(0xDB, bytes(30))),
      "short-jfif": _with_segment(plain, _segment(0xE0, b"JFIF\0"), before=b"\xff\xdb"),
      "mpf-index": _with_segment(plain, _segment(0xE2, b"MPF\0" + bytes(8)), before=b"\xff\xdb"),
      "decompression-bomb": plain.replace(b"\x00\x0a\x00\x1e", b"\x3a\x98\x3a\x98", 1),  # 15000 x 15000
      "second-frame-header": _with_segment(plain, plain[plain.index(b"\xff\xc0"):plain.index(b"\xff\xc4")]),
  }[case]
  expected = _pil_outcome(data)
  if case == "exif-after-frame-header":
    assert expected == (30, 10) and image_ops._jpeg_header(data)[:2] == (10, 30)  # read past the frame header
  else:
    assert image_ops._jpeg_header(data) is None
  try:
    got = image_ops.whole_image_size(data)
  except Exception as e:  # noqa: BLE001
    got = type(e).__name__
  assert got == expected
  if case in ("reserved-marker", "short-jfif", "decompression-bomb"):
    assert isinstance(expected, str)  # PIL refuses these: planning must too, not the shard writer later


def test_a_png_with_corrupt_pixels_and_right_crcs_fails_to_decode():
  """getexif() of a PNG loads its pixels; reading the orientation first once swallowed the decoding error and
  wrote a half-decoded image."""
  import zlib
  data = bytearray(_encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 32, 3), np.uint8)),
                            "PNG"))
  idat = data.index(b"IDAT")
  length = int.from_bytes(data[idat - 4:idat], "big")
  data[idat + 4 + 10:idat + 4 + 20] = bytes(10)  # corrupt the zlib stream ...
  data[idat + 4 + length:idat + 8 + length] = zlib.crc32(data[idat:idat + 4 + length]).to_bytes(4, "big")  # ... CRC fixed
  assert image_ops.whole_image_size(bytes(data)) == (16, 32)  # whole by its CRCs: planning accepts it
  with pytest.raises(Exception):
    image_ops.decode_rgb(bytes(data))


def test_png_orientation_in_an_exif_text_chunk_is_left_to_pil():
  from PIL import PngImagePlugin
  info = PngImagePlugin.PngInfo()
  info.add_text("exif", _rotated_exif()[6:].decode("latin-1"))
  data = _encode(Image.new("RGB", (30, 10)), "PNG", pnginfo=info)
  assert image_ops.whole_image_size(data) == image_ops.decode_rgb(data).shape[:2] == _pil_outcome(data)
