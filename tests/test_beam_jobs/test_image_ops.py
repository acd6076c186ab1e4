import io

import numpy as np
import pytest
from PIL import Image

from beam_jobs import image_ops


@pytest.mark.parametrize("h, w, budget, expected", [
    (64, 32, 64, (4, 2)),        # native size fits: kept
    (40, 24, 64, (2, 2)),        # rounded to whole patches (2.5 -> 2, 1.5 -> 2)
    (5, 5, 64, (1, 1)),          # tiny: at least one patch
    (512, 512, 64, (8, 8)),      # huge: scaled down to the budget
    (160, 480, 64, (4, 13)),     # aspect 1:3 kept within a patch
    (16, 4000, 64, (1, 64)),     # extreme aspect clamps to one row
])
def test_fit_patch_grid(h, w, budget, expected):
  rows, cols = image_ops.fit_patch_grid(h, w, 16, budget)
  assert (rows, cols) == expected
  assert rows * cols <= budget


def test_fit_patch_grid_preserves_aspect_within_one_patch():
  rng = np.random.default_rng(0)
  for _ in range(500):
    h, w = rng.integers(8, 2000, size=2)
    rows, cols = image_ops.fit_patch_grid(int(h), int(w), 16, 64)
    assert 1 <= rows * cols <= 64
    if rows > 1 and cols > 1:
      assert abs(cols - rows * w / h) <= 1.0 + 1e-9 or abs(rows - cols * h / w) <= 1.0 + 1e-9


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


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_decode_converts_modes_to_rgb(mode):
  fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
  image = Image.new(mode, (7, 5))
  out = image_ops.decode_rgb(_encode(image, fmt))
  assert out.shape == (5, 7, 3) and out.dtype == np.uint8


def test_decode_applies_exif_orientation():
  image = Image.new("RGB", (8, 4), (255, 0, 0))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees on display
  out = image_ops.decode_rgb(_encode(image, "JPEG", exif=exif.tobytes()))
  assert out.shape == (8, 4, 3)


def test_decode_rejects_non_image():
  with pytest.raises(Exception):
    image_ops.decode_rgb(b"definitely not an image")
