"""Pure image functions of the shard builder: decode, fit to a patch grid, resize, patchify."""

import io
import math

import numpy as np
from PIL import Image, ImageOps


def decode_rgb(data: bytes) -> np.ndarray:
  """Decodes any PIL-readable image to uint8 RGB [H, W, 3], applying EXIF orientation."""
  with Image.open(io.BytesIO(data)) as image:
    image = ImageOps.exif_transpose(image)
    if image.mode == "I;16" or image.mode.startswith("I;16") or image.mode == "I":
      # 16-bit: keep the high byte, so the full range maps onto 0..255.
      image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def fit_patch_grid(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
  """Grid (rows, cols) of the resized image: native size rounded to whole patches when it fits
  `max_patches`, else the largest aspect-preserving grid that does. Never less than one patch a side."""
  rows = max(1, round(height / patch_size))
  cols = max(1, round(width / patch_size))
  if rows * cols <= max_patches:
    return rows, cols
  scale = math.sqrt(max_patches / (height * width / patch_size**2))
  rows = max(1, math.floor(height / patch_size * scale))
  cols = max(1, math.floor(width / patch_size * scale))
  while rows * cols > max_patches:  # floor() can still overshoot when one side is clamped to 1.
    if rows >= cols:
      rows -= 1
    else:
      cols -= 1
  return rows, cols


def resize_to_grid(pixels: np.ndarray, rows: int, cols: int, patch_size: int) -> np.ndarray:
  height, width = rows * patch_size, cols * patch_size
  if pixels.shape[:2] == (height, width):
    return pixels
  image = Image.fromarray(pixels, "RGB").resize((width, height), Image.Resampling.BILINEAR)
  return np.asarray(image, dtype=np.uint8)


def patchify(pixels: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """[rows*p, cols*p, 3] -> patches uint8 [rows*cols, p*p*3] (row, column, channel order inside each
  patch; patches in raster order) and their grid positions int32 [rows*cols, 2]."""
  height, width, channels = pixels.shape
  rows, cols = height // patch_size, width // patch_size
  patches = pixels.reshape(rows, patch_size, cols, patch_size, channels).transpose(0, 2, 1, 3, 4)
  patches = patches.reshape(rows * cols, patch_size * patch_size * channels)
  yy, xx = np.meshgrid(np.arange(rows, dtype=np.int32), np.arange(cols, dtype=np.int32), indexing="ij")
  return np.ascontiguousarray(patches), np.stack([yy.reshape(-1), xx.reshape(-1)], axis=1)


def unpatchify(patches: np.ndarray, rows: int, cols: int, patch_size: int) -> np.ndarray:
  """Inverse of patchify: patches [rows*cols, p*p*3] -> image [rows*p, cols*p, 3]."""
  grid = patches.reshape(rows, cols, patch_size, patch_size, 3).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * patch_size, cols * patch_size, 3)


def byte_tokens(text: str) -> np.ndarray:
  """Byte-level tokenizer: UTF-8 bytes shifted by one, so 0 stays free for padding."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + 1
