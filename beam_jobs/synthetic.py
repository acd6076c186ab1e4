"""A deterministic synthetic multimodal source: images of varied size and aspect ratio holding 1-3 coloured
shapes, labelled by the colour of the largest shape, with a caption, train/val/test splits and noisy copies of
the test split at a few levels (distribution shift for calibration studies)."""

import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
_RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220),
        "yellow": (230, 210, 40), "magenta": (200, 50, 200), "cyan": (40, 200, 210)}
SHAPES = ("circle", "square", "triangle")
DEFAULT_SPLITS = {"train": 600, "val": 150, "test": 150}
DEFAULT_NOISE_LEVELS = (1, 2, 3)
NOISE_STD_PER_LEVEL = 40.0  # pixel-value std of the Gaussian noise added at shift level 1.


def shift_split_name(level: int) -> str:
  return f"test-noise{level}"


def _draw_example(rng: np.random.Generator) -> tuple[Image.Image, int, str]:
  long_side = int(rng.integers(32, 161))
  aspect = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
  if aspect >= 1:
    w, h = long_side, max(8, round(long_side / aspect))
  else:
    h, w = long_side, max(8, round(long_side * aspect))
  base = rng.integers(90, 170)
  background = np.clip(base + rng.normal(0, 6, size=(h, w, 3)), 0, 255).astype(np.uint8)
  image = Image.fromarray(background, "RGB")
  draw = ImageDraw.Draw(image)
  num_shapes = int(rng.integers(1, 4))
  colours = rng.choice(len(CLASS_NAMES), size=num_shapes, replace=False)
  # Sizes strictly decreasing so "the largest shape" is well defined.
  short = min(h, w)
  sizes = sorted(rng.uniform(0.25, 0.9, size=num_shapes) * short, reverse=True)
  sizes = [sizes[0]] + [min(s, sizes[0] * 0.6) for s in sizes[1:]]
  parts = []
  # Draw smaller shapes last so the largest is never hidden entirely.
  for size, colour in zip(sizes, colours):
    size = max(4.0, size)
    cy = rng.uniform(size / 2, h - size / 2) if h > size else h / 2
    cx = rng.uniform(size / 2, w - size / 2) if w > size else w / 2
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    box = [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]
    fill = _RGB[CLASS_NAMES[colour]]
    if kind == "circle":
      draw.ellipse(box, fill=fill)
    elif kind == "square":
      draw.rectangle(box, fill=fill)
    else:
      draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    parts.append(f"a {'big' if not parts else 'small'} {CLASS_NAMES[colour]} {kind}")
  return image, int(colours[0]), " with ".join(parts)


def _add_noise(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
  pixels = np.asarray(image, dtype=np.float32)
  noisy = pixels + rng.normal(0, NOISE_STD_PER_LEVEL * level, size=pixels.shape)
  return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")


def example_tasks(seed: int = 0, splits: dict[str, int] | None = None,
                  noise_levels: tuple[int, ...] = DEFAULT_NOISE_LEVELS) -> list[tuple[int, int, str, int, int]]:
  """What generate_synthetic writes, in manifest order: (seed, split index, split, example index, noise level)
  with level 0 for a clean example. The manifest line of task k is k + 1."""
  splits = dict(DEFAULT_SPLITS if splits is None else splits)
  tasks = []
  for split_index, (split, count) in enumerate(sorted(splits.items())):
    for i in range(count):
      tasks.append((seed, split_index, split, i, 0))
      if split == "test":
        tasks.extend((seed, split_index, split, i, level) for level in noise_levels)
  return tasks


def render_example(task: tuple[int, int, str, int, int]) -> tuple[dict, bytes]:
  """One task of `example_tasks` -> (manifest record, PNG bytes); a pure function of the task, so any worker
  renders the same bytes that generate_synthetic writes to disk."""
  seed, split_index, split, i, level = task
  image, label, caption = _draw_example(np.random.default_rng([seed, split_index, i]))
  if level:
    image = _add_noise(image, level, np.random.default_rng([seed, 1000 + level, i]))
    split = shift_split_name(level)
  rid = f"{split}-{i:05d}"
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  record = {"id": rid, "image": os.path.join("images", f"{rid}.png"), "label": label, "text": caption,
            "split": split}
  return record, buffer.getvalue()


def generate_synthetic(output_dir: str, seed: int = 0, splits: dict[str, int] | None = None,
                       noise_levels: tuple[int, ...] = DEFAULT_NOISE_LEVELS) -> str:
  """Writes PNG images and `manifest.jsonl` under output_dir; returns the manifest path.

  Same seed and sizes give byte-identical files: every example draws from its own seeded generator.
  """
  image_dir = os.path.join(output_dir, "images")
  os.makedirs(image_dir, exist_ok=True)
  records = []
  for task in example_tasks(seed, splits, noise_levels):
    record, png = render_example(task)
    path = os.path.join(output_dir, record["image"])
    with open(path + ".tmp", "wb") as f:
      f.write(png)
    os.replace(path + ".tmp", path)
    records.append(record)
  manifest = os.path.join(output_dir, "manifest.jsonl")
  with open(manifest + ".tmp", "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, sort_keys=True) + "\n")
  os.replace(manifest + ".tmp", manifest)
  with open(os.path.join(output_dir, "classes.json"), "w", encoding="utf-8") as f:
    json.dump({"class_names": list(CLASS_NAMES)}, f)
  return manifest
