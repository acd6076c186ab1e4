"""Deterministic synthetic videos for action localisation (STAR) and co-finetuning: small mp4 clips of
coloured shapes (actors) over a textured background, each actor doing one of eight actions that only time
tells apart. Two data sets with one look:

  action clips (`generate_action_clips`, downstream, localisation): 1-3 actors per clip, each acting over a
    span of frames (it appears at the span's first frame and leaves after its last) with a box on every frame
    of the span; classes long-tailed (CLASS_PROFILE).
  action classes (`generate_action_classes`, upstream, video classification): one actor acting over the whole
    clip, the clip labelled by its action; classes balanced.

An actor's shape, colour, size, place and orientation are drawn independently of its action, so a single
frame says nothing of the action. Every actor wears a dark spot off its centre, so a rotating circle is seen
to rotate.

Labels come first, per split, as a pure function of the seed (the `plan_*` functions render nothing); then
each clip's geometry from its own generator. The same seed and parameters give the same bytes of every file:
the mp4 encoder and its options are pinned (one thread, FFmpeg's bitexact flags: no version string, no
creation time).
"""

import dataclasses
import io
import json
import math
import os

import av
import numpy as np
from PIL import Image, ImageDraw

from schemas.errors import ContractError

# Class ids are ranks of the downstream train frequency: class k has weight 1 / (k + 1) ** CLASS_PROFILE_EXPONENT,
# so the rarest class is 8 ** 1.5 = 22.6 times rarer than the most common. Opposite actions sit apart in the
# ranking (right/left, grow/shrink, up/down), so a rare class differs from a common one only in its direction.
CLASS_NAMES = ("move_right", "grow", "rotate", "move_up", "move_left", "blink", "shrink", "move_down")
CLASS_PROFILE_EXPONENT = 1.5
_RANK_WEIGHTS = 1.0 / np.arange(1, len(CLASS_NAMES) + 1) ** CLASS_PROFILE_EXPONENT
CLASS_PROFILE = tuple((_RANK_WEIGHTS / _RANK_WEIGHTS.sum()).tolist())  # the fraction of tubelets of each class

SHAPES = ("circle", "square", "triangle")
COLOURS = ((220, 40, 40), (40, 180, 60), (50, 70, 220), (230, 210, 40), (200, 50, 200), (40, 200, 210))
SPLITS = ("train", "val", "test")
DEFAULT_SPLITS = {"train": 400, "val": 100, "test": 100}
DEFAULT_CLASS_SPLITS = {"train": 1200, "val": 300, "test": 300}  # upstream: 3x the downstream train split
DEFAULT_FRAMES = 16
DEFAULT_SIZE = 64
DEFAULT_FPS = 8
MIN_FRAMES = 8   # the shortest span: enough frames for a move or a blink to show
MIN_SIZE = 32
MAX_ACTORS = 3

# Geometry, in fractions of the frame side or of the actor's radius.
RADIUS_RANGE = (0.10, 0.16)     # the actor's radius at the middle of its span, x frame side
MOVE_RANGE = (0.25, 0.45)       # a mover's travel over its span, x frame side
SCALE_RANGE = (1.8, 2.5)        # a grower's (shrinker's) radius ratio from the first to the last frame
TURN_RANGE = (20.0, 45.0)       # a rotator's turn per frame, degrees, either way
DIM_BRIGHTNESS = 0.35           # a blinker's brightness when off
_VERTEX_RADIUS = {"square": math.sqrt(2), "triangle": 1.25}  # polygon vertices, x radius (a square's half side is r)
_SPOT_OFFSET, _SPOT_RADIUS, _SPOT_SHADE = 0.45, 0.28, 0.35
_SUPERSAMPLE = 4                # frames are drawn 4x larger and box-filtered down, so slow motion stays smooth
_MARGIN = 1.0                   # pixels kept between an actor and the frame's edge

# The mp4 encoding, pinned: one thread and bitexact flags make the bytes a function of the frames alone (and of
# the FFmpeg build that uv.lock pins with PyAV). Quantiser 2-3 keeps the quality nearly constant.
VIDEO_CODEC = "mpeg4"
VIDEO_CODEC_OPTIONS = {"flags": "+bitexact", "qmin": "2", "qmax": "3", "threads": "1"}
VIDEO_FORMAT_OPTIONS = {"fflags": "+bitexact"}

_CLIPS, _CLASSES = 0, 1  # seed namespaces of the two data sets


@dataclasses.dataclass(frozen=True)
class Actor:
  label: int
  shape: str
  colour: tuple[int, int, int]
  start: int                # the first frame of the span
  states: np.ndarray        # float64 [span, 5]: centre y, x and radius (pixels), angle (radians), brightness


@dataclasses.dataclass(frozen=True)
class ClipPlan:
  """Everything a clip is, before it is drawn: render_frames(plan) draws it."""
  id: str
  split: str
  frames: int
  size: int
  actors: tuple[Actor, ...]
  background_seed: tuple[int, ...]


# ------------------------------------------------------------------------------------------------ planning

def quota_labels(rng: np.random.Generator, count: int, weights) -> np.ndarray:
  """`count` labels whose class counts follow `weights` as closely as integers can (largest remainder, ties
  to the lower class id), in a random order."""
  weights = np.asarray(weights, np.float64)
  exact = count * weights / weights.sum()
  counts = np.floor(exact).astype(np.int64)
  counts[np.argsort(-(exact - counts), kind="stable")[:count - counts.sum()]] += 1
  return rng.permutation(np.repeat(np.arange(len(weights)), counts))


def _actor_states(rng: np.random.Generator, label: int, span: int, size: int) -> np.ndarray:
  """Per-frame states (Actor.states) of an actor doing CLASS_NAMES[label] over `span` frames, its centre as an
  offset from its place (which _plan_actor chooses)."""
  u = np.linspace(-0.5, 0.5, span)  # the span's time, centred: the actor's look at u = 0 is action-independent
  action = CLASS_NAMES[label]
  radius = np.full(span, rng.uniform(*RADIUS_RANGE) * size)
  angle = np.full(span, rng.uniform(0, 2 * math.pi))
  brightness = np.ones(span)
  offset = np.zeros((span, 2))
  if action.startswith("move_"):
    direction = {"move_right": (0, 1), "move_left": (0, -1), "move_up": (-1, 0), "move_down": (1, 0)}[action]
    offset = u[:, None] * rng.uniform(*MOVE_RANGE) * size * np.array(direction, np.float64)
  elif action in ("grow", "shrink"):
    log_ratio = math.log(rng.uniform(*SCALE_RANGE)) * (1 if action == "grow" else -1)
    radius = radius * np.exp(u * log_ratio)
  elif action == "rotate":
    turn = math.radians(rng.uniform(*TURN_RANGE)) * rng.choice((-1, 1))
    angle = angle + turn * np.arange(span)
  elif action == "blink":
    half_period, phase = int(rng.integers(1, 3)), int(rng.integers(2))
    brightness = np.where((np.arange(span) // half_period + phase) % 2 == 0, 1.0, DIM_BRIGHTNESS)
  return np.stack([offset[:, 0], offset[:, 1], radius, angle, brightness], axis=1)


def _extents(shape: str, states: np.ndarray) -> np.ndarray:
  """Boxes [ymin, xmin, ymax, xmax] (pixels) of the actor on each frame of `states`."""
  cy, cx, radius = states[:, 0], states[:, 1], states[:, 2]
  if shape == "circle":
    return np.stack([cy - radius, cx - radius, cy + radius, cx + radius], axis=1)
  ys, xs = _vertices(shape, states)
  return np.stack([ys.min(1), xs.min(1), ys.max(1), xs.max(1)], axis=1)


def _vertices(shape: str, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Polygon vertices (y [F, n], x [F, n]) of a square or triangle on each frame; the first points at its angle."""
  n = 4 if shape == "square" else 3
  angles = states[:, 3:4] + np.arange(n) * 2 * math.pi / n
  reach = _VERTEX_RADIUS[shape] * states[:, 2:3]
  return states[:, 0:1] + reach * np.sin(angles), states[:, 1:2] + reach * np.cos(angles)


def _plan_actor(rng: np.random.Generator, label: int, start: int, span: int, size: int) -> Actor:
  shape = SHAPES[int(rng.integers(len(SHAPES)))]
  colour = COLOURS[int(rng.integers(len(COLOURS)))]
  states = _actor_states(rng, label, span, size)
  # Place the centre (so far 0) uniformly where the whole trajectory's boxes fit inside the frame: the ranges
  # above keep every trajectory within 0.91 of the side (a mover), so there is always room.
  boxes = _extents(shape, states)
  low = _MARGIN - boxes[:, :2].min(0)
  high = size - _MARGIN - boxes[:, 2:].max(0)
  states[:, :2] += rng.uniform(low, high)
  return Actor(label=int(label), shape=shape, colour=colour, start=start, states=states)


def _check_parameters(seed: int, splits: dict[str, int], frames: int, size: int) -> list[str]:
  """Raises ContractError on a bad parameter; returns the split names in SPLITS order (the manifest's)."""
  if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
    raise ContractError(f"seed: a non-negative integer, got {seed!r}")
  for split, count in splits.items():
    if split not in SPLITS:
      raise ContractError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
      raise ContractError(f"split {split!r}: the number of clips must be a non-negative integer, got {count!r}")
  if not isinstance(frames, int) or frames < MIN_FRAMES:
    raise ContractError(f"frames: at least {MIN_FRAMES} frames per clip, got {frames!r}")
  if not isinstance(size, int) or size < MIN_SIZE or size % 2:
    raise ContractError(f"size: an even number of pixels, at least {MIN_SIZE}, got {size!r}")
  return sorted(splits, key=SPLITS.index)


def _check_fps(fps: int) -> None:
  if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
    raise ContractError(f"fps: a positive integer, got {fps!r}")


def plan_action_clips(seed: int = 0, splits: dict[str, int] | None = None, frames: int = DEFAULT_FRAMES,
                      size: int = DEFAULT_SIZE) -> list[ClipPlan]:
  """The downstream clips, planned (nothing drawn), in manifest order. A split's labels are drawn first: the
  number of actors of each clip, then the labels of all of them by quota of CLASS_PROFILE in a random order."""
  splits = dict(DEFAULT_SPLITS if splits is None else splits)
  shortest_span = max(MIN_FRAMES, (frames + 1) // 2)
  plans = []
  for split in _check_parameters(seed, splits, frames, size):
    count = splits[split]
    split_index = SPLITS.index(split)
    split_rng = np.random.default_rng([seed, _CLIPS, split_index])
    num_actors = split_rng.integers(1, MAX_ACTORS + 1, size=count)
    labels = quota_labels(split_rng, int(num_actors.sum()), CLASS_PROFILE)
    first = np.concatenate([[0], np.cumsum(num_actors)])
    for i in range(count):
      rng = np.random.default_rng([seed, _CLIPS, split_index, i, 0])
      actors = []
      for label in labels[first[i]:first[i + 1]]:
        span = int(rng.integers(shortest_span, frames + 1))
        start = int(rng.integers(0, frames - span + 1))
        actors.append(_plan_actor(rng, label, start, span, size))
      plans.append(ClipPlan(f"{split}-{i:05d}", split, frames, size, tuple(actors), (seed, _CLIPS, split_index, i, 1)))
  return plans


def plan_action_classes(seed: int = 0, splits: dict[str, int] | None = None, frames: int = DEFAULT_FRAMES,
                        size: int = DEFAULT_SIZE) -> list[ClipPlan]:
  """The upstream clips, planned: one actor acting over the whole clip, balanced labels (by quota)."""
  splits = dict(DEFAULT_CLASS_SPLITS if splits is None else splits)
  plans = []
  for split in _check_parameters(seed, splits, frames, size):
    split_index = SPLITS.index(split)
    labels = quota_labels(np.random.default_rng([seed, _CLASSES, split_index]), splits[split],
                          np.ones(len(CLASS_NAMES)))
    for i, label in enumerate(labels):
      rng = np.random.default_rng([seed, _CLASSES, split_index, i, 0])
      actor = _plan_actor(rng, label, 0, frames, size)
      plans.append(ClipPlan(f"{split}-{i:05d}", split, frames, size, (actor,), (seed, _CLASSES, split_index, i, 1)))
  return plans


def actor_boxes(actor: Actor, size: int) -> list[list]:
  """[[t, ymin, xmin, ymax, xmax], ...], one box per frame of the actor's span, normalised to [0, 1]."""
  boxes = np.clip(_extents(actor.shape, actor.states) / size, 0.0, 1.0).round(4)
  return [[actor.start + k, *map(float, box)] for k, box in enumerate(boxes)]


# ------------------------------------------------------------------------------------------------ drawing

def _background(plan: ClipPlan) -> np.ndarray:
  """A clip's still background: a muted, blotchy base colour, faint stripes and grain; float32 [H, W, 3]."""
  rng = np.random.default_rng(list(plan.background_seed))
  size = plan.size
  blotches = Image.fromarray(rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8), "RGB")
  blotches = np.asarray(blotches.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255 - 0.5
  base = rng.uniform(90, 160) + rng.normal(0, 10, size=3)
  yy, xx = np.mgrid[0:size, 0:size]
  heading = rng.uniform(0, math.pi)
  stripes = 8 * np.sin(2 * math.pi * (xx * math.cos(heading) + yy * math.sin(heading)) / rng.uniform(6, 12))
  grain = rng.normal(0, 4, size=(size, size, 1))
  return (base + 50 * blotches + stripes[..., None] + grain).astype(np.float32)


def render_frames(plan: ClipPlan) -> np.ndarray:
  """The clip's frames, uint8 RGB [F, H, W, 3]: actors drawn 4x larger over the background, then box-filtered."""
  k = _SUPERSAMPLE
  background = Image.fromarray(np.clip(_background(plan), 0, 255).round().astype(np.uint8), "RGB")
  background = background.resize((plan.size * k, plan.size * k), Image.Resampling.NEAREST)
  out = np.empty((plan.frames, plan.size, plan.size, 3), np.uint8)
  for t in range(plan.frames):
    canvas = background.copy()
    draw = ImageDraw.Draw(canvas)
    for actor in plan.actors:
      if actor.start <= t < actor.start + len(actor.states):
        _draw_actor(draw, actor, actor.states[t - actor.start:t - actor.start + 1], k)
    out[t] = np.asarray(canvas.reduce(k))
  return out


def _draw_actor(draw: ImageDraw.ImageDraw, actor: Actor, state: np.ndarray, k: int) -> None:
  cy, cx, radius, angle, brightness = state[0]
  fill = tuple(round(c * brightness) for c in actor.colour)
  if actor.shape == "circle":
    draw.ellipse(_scaled_box(cy, cx, radius, k), fill=fill)
  else:
    ys, xs = _vertices(actor.shape, state)
    draw.polygon([(k * x - 0.5, k * y - 0.5) for y, x in zip(ys[0], xs[0])], fill=fill)
  spot_y = cy + _SPOT_OFFSET * radius * math.sin(angle)
  spot_x = cx + _SPOT_OFFSET * radius * math.cos(angle)
  draw.ellipse(_scaled_box(spot_y, spot_x, _SPOT_RADIUS * radius, k),
               fill=tuple(round(c * _SPOT_SHADE) for c in fill))


def _scaled_box(cy: float, cx: float, radius: float, k: int) -> list[float]:
  # PIL's ellipse box is inclusive of its last pixel.
  return [k * (cx - radius), k * (cy - radius), k * (cx + radius) - 1, k * (cy + radius) - 1]


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
  """uint8 RGB frames [F, H, W, 3] -> mp4 bytes (VIDEO_CODEC, yuv420p, constant frame rate)."""
  buffer = io.BytesIO()
  with av.open(buffer, mode="w", format="mp4", options=dict(VIDEO_FORMAT_OPTIONS)) as container:
    stream = container.add_stream(VIDEO_CODEC, rate=fps, options=dict(VIDEO_CODEC_OPTIONS))
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    stream.thread_type, stream.thread_count = "NONE", 1
    for pixels in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    container.mux(stream.encode())
  return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ writing

def clip_record(plan: ClipPlan) -> dict:
  """A downstream manifest record: id, video, split and the actors' tubelets."""
  return {"id": plan.id, "video": _video_path(plan), "split": plan.split,
          "tubelets": [{"label": a.label, "boxes": actor_boxes(a, plan.size)} for a in plan.actors]}


def class_record(plan: ClipPlan) -> dict:
  """An upstream manifest record: id, video, split and the one actor's action."""
  return {"id": plan.id, "video": _video_path(plan), "split": plan.split, "label": plan.actors[0].label}


def _video_path(plan: ClipPlan) -> str:
  return f"videos/{plan.id}.mp4"


def generate_action_clips(output_dir: str, seed: int = 0, splits: dict[str, int] | None = None,
                          frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE, fps: int = DEFAULT_FPS,
                          log=None) -> dict:
  """Writes the downstream (localisation) data set under output_dir: `videos/<id>.mp4`, `manifest.jsonl`
  (records of clip_record), `classes.json` (class names, train tubelets per class) and
  `ground_truth/<split>.jsonl` (the tubes in the format of `patchflow localisation-metrics`). Returns the
  summary: clips and tubes per split, tubes per class and split, files and bytes written."""
  splits = dict(DEFAULT_SPLITS if splits is None else splits)
  _check_fps(fps)
  plans = plan_action_clips(seed, splits, frames, size)
  records = [clip_record(plan) for plan in plans]
  class_counts = {split: [0] * len(CLASS_NAMES) for split in splits}
  ground_truth = {split: [] for split in splits}
  for record in records:
    for tube in record["tubelets"]:
      class_counts[record["split"]][tube["label"]] += 1
      ground_truth[record["split"]].append({"video": record["id"], "label": tube["label"], "boxes": tube["boxes"]})
  written = _write_videos(output_dir, plans, fps, log, "actions")
  for split, tubes in ground_truth.items():
    written.append(_write_jsonl(os.path.join(output_dir, "ground_truth", f"{split}.jsonl"), tubes))
  written.append(_write_jsonl(os.path.join(output_dir, "manifest.jsonl"), records))
  written.append(_write_classes(output_dir, class_counts.get("train", [0] * len(CLASS_NAMES))))
  return _summary(output_dir, seed, splits, frames, size, fps, class_counts, written,
                  tubes={split: len(tubes) for split, tubes in ground_truth.items()})


def generate_action_classes(output_dir: str, seed: int = 0, splits: dict[str, int] | None = None,
                            frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE, fps: int = DEFAULT_FPS,
                            log=None) -> dict:
  """Writes the upstream (video classification) data set under output_dir: `videos/<id>.mp4`,
  `manifest.jsonl` (records of class_record) and `classes.json` (class names, train clips per class). Returns
  the summary: clips per split, clips per class and split, files and bytes written."""
  splits = dict(DEFAULT_CLASS_SPLITS if splits is None else splits)
  _check_fps(fps)
  plans = plan_action_classes(seed, splits, frames, size)
  records = [class_record(plan) for plan in plans]
  class_counts = {split: [0] * len(CLASS_NAMES) for split in splits}
  for record in records:
    class_counts[record["split"]][record["label"]] += 1
  written = _write_videos(output_dir, plans, fps, log, "action-classes")
  written.append(_write_jsonl(os.path.join(output_dir, "manifest.jsonl"), records))
  written.append(_write_classes(output_dir, class_counts.get("train", [0] * len(CLASS_NAMES))))
  return _summary(output_dir, seed, splits, frames, size, fps, class_counts, written)


def _write_videos(output_dir: str, plans: list[ClipPlan], fps: int, log, what: str) -> list[int]:
  """Draws, encodes and writes every clip; removes other mp4 files of videos/ (a larger earlier run's), so
  the folder holds exactly the manifest's videos. Returns the bytes of each file written."""
  video_dir = os.path.join(output_dir, "videos")
  os.makedirs(video_dir, exist_ok=True)
  written, every = [], max(1, len(plans) // 10)
  for n, plan in enumerate(plans, 1):
    written.append(_write_bytes(os.path.join(output_dir, _video_path(plan)), encode_mp4(render_frames(plan), fps)))
    if log and (n % every == 0 or n == len(plans)):
      log(f"{what}: {n}/{len(plans)} clips written")
  keep = {os.path.basename(_video_path(plan)) for plan in plans}
  for name in sorted(os.listdir(video_dir)):
    if name.endswith(".mp4") and name not in keep:
      os.remove(os.path.join(video_dir, name))
  return written


def _write_bytes(path: str, data: bytes) -> int:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)
  return len(data)


def _write_jsonl(path: str, rows: list[dict]) -> int:
  return _write_bytes(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode())


def _write_classes(output_dir: str, train_counts: list[int]) -> int:
  classes = {"class_names": list(CLASS_NAMES), "train_counts": train_counts}
  return _write_bytes(os.path.join(output_dir, "classes.json"), (json.dumps(classes) + "\n").encode())


def _summary(output_dir, seed, splits, frames, size, fps, class_counts, written, tubes=None) -> dict:
  summary = {"output_dir": output_dir, "manifest": os.path.join(output_dir, "manifest.jsonl"), "seed": seed,
             "frames": frames, "size": size, "fps": fps, "class_names": list(CLASS_NAMES), "clips": dict(splits),
             "class_counts": class_counts, "num_files": len(written), "num_bytes": sum(written)}
  if tubes is not None:
    summary["tubes"] = tubes
  return summary
