"""Manifest records (JSONL, one source example per line): the contract of DESIGN.md ("Contracts")."""

import dataclasses
import json
import math
import re
from typing import Any, Iterator

from schemas.errors import ContractError

DEFAULT_SPLIT = "train"
# A split names a folder of the shard directory: a safe charset, bounded, never '.' or '..' (no leading dot).
MAX_SPLIT_CHARS = 64
_SPLIT_NAME = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,{MAX_SPLIT_CHARS - 1}}}")
MAX_LABEL = 2 ** 31 - 1  # labels are int32 in the shards; -1 and -2 are reserved there
FLOAT32_MAX = 3.4028234663852886e38
_KNOWN_FIELDS = {"id", "image", "video", "text", "label", "boxes", "tubelets", "split"}
_TUBELET_FIELDS = {"label", "boxes"}
_NUMBER_TYPES = {int, float}  # exact types: a JSON true/false (bool) is not a number here


@dataclasses.dataclass(frozen=True)
class Tubelet:
  """One actor of a clip (STAR): its class and its boxes (t, ymin, xmin, ymax, xmax), t the frame index in the
  source clip and the coordinates normalised to [0, 1]; in manifest order, each t at most once."""
  label: int
  boxes: tuple[tuple[int, float, float, float, float], ...]


@dataclasses.dataclass(frozen=True)
class ManifestRecord:
  id: str
  label: int | None  # None only beside `tubelets`: a localisation clip need not have one label
  image: str | None = None
  video: tuple[str, ...] | str | None = None
  text: str | None = None
  boxes: tuple[tuple[float, ...], ...] | None = None
  tubelets: tuple[Tubelet, ...] | None = None
  split: str = DEFAULT_SPLIT
  line: int = 0  # 1-based line in the manifest, so later errors can point back at it.

  def to_json(self) -> dict[str, Any]:
    out = {"id": self.id, "split": self.split}
    if self.label is not None:
      out["label"] = self.label
    if self.image is not None:
      out["image"] = self.image
    if self.video is not None:
      out["video"] = list(self.video) if isinstance(self.video, tuple) else self.video
    if self.text is not None:
      out["text"] = self.text
    if self.boxes is not None:
      out["boxes"] = [list(b) for b in self.boxes]
    if self.tubelets is not None:
      out["tubelets"] = [{"label": tube.label, "boxes": [list(b) for b in tube.boxes]} for tube in self.tubelets]
    return out


def split_name_problem(split) -> str | None:
  """Why `split` cannot name a split (a folder under the output directory), or None."""
  if isinstance(split, str) and _SPLIT_NAME.fullmatch(split):
    return None
  return (f"must be 1 to {MAX_SPLIT_CHARS} of A-Z a-z 0-9 _ . - (not starting with '.'), "
          f"got {_shown(split)}")


def _shown(value, limit: int = 40) -> str:
  """repr() of a value, cut to `limit` characters, so an error line stays one short line."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + f"... ({len(value) if isinstance(value, str) else '?'} chars)"


def load_json_line(text: str, where: str):
  """json.loads of one line; any failure (bad syntax, an int of more digits than Python converts, nesting
  deeper than the recursion limit) is a ContractError naming `where`."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ContractError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
  except RecursionError:
    raise ContractError(f"{where}: not valid JSON (nested too deeply)") from None
  except ValueError as e:
    raise ContractError(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None


def _check_string(value: str, field: str, where: str, path: bool = False) -> None:
  """A string the shards or the file system will take: valid Unicode (JSON's \\ud800 escapes decode to lone
  surrogates, which UTF-8 cannot encode) and, for a path, no NUL."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise ContractError(f"{where}: field {field!r} is not valid Unicode (a lone surrogate)") from None
  if path and "\0" in value:
    raise ContractError(f"{where}: field {field!r} holds a NUL character")


def parse_manifest_line(text: str, line: int, source: str = "manifest",
                        class_names: tuple[str, ...] = ()) -> ManifestRecord:
  """Parses and validates one manifest line; raises ContractError naming `source:line` and the field."""
  where = f"{source}:{line}"
  obj = load_json_line(text, where)
  if not isinstance(obj, dict):
    raise ContractError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  unknown = sorted(set(obj) - _KNOWN_FIELDS)
  if unknown:
    raise ContractError(f"{where}: unknown field {unknown[0]!r} (known: {sorted(_KNOWN_FIELDS)})")
  rid = obj.get("id")
  if not isinstance(rid, str) or not rid:
    raise ContractError(f"{where}: field 'id' must be a non-empty string")
  _check_string(rid, "id", where)
  where = f"{where} (id {_shown(rid)})"
  image, video = obj.get("image"), obj.get("video")
  if (image is None) == (video is None):
    raise ContractError(f"{where}: exactly one of fields 'image' and 'video' is required")
  if image is not None and (not isinstance(image, str) or not image):
    raise ContractError(f"{where}: field 'image' must be a non-empty path string")
  if image is not None:
    _check_string(image, "image", where, path=True)
  if video is not None:
    if isinstance(video, list):
      if not video or not all(isinstance(f, str) and f for f in video):
        raise ContractError(f"{where}: field 'video' must be a non-empty list of frame paths")
      video = tuple(video)
    elif not isinstance(video, str) or not video:
      raise ContractError(f"{where}: field 'video' must be a path or a list of frame paths")
    for frame in (video,) if isinstance(video, str) else video:
      _check_string(frame, "video", where, path=True)
  tubelets = obj.get("tubelets")
  if tubelets is not None:
    if video is None:
      raise ContractError(f"{where}: field 'tubelets' needs field 'video' (a tubelet is boxes over a clip's frames)")
    tubelets = _parse_tubelets(tubelets, where, class_names)
    if isinstance(video, tuple):  # a frame list's length is known here; a video file's once planning counts it
      error = tubelet_frame_error(tubelets, len(video))
      if error:
        raise ContractError(f"{where}: {error}")
  label = obj.get("label")
  if label is not None or tubelets is None:
    label = _class_id(label, "field 'label'", where, class_names)
  text_field = obj.get("text")
  if text_field is not None:
    if not isinstance(text_field, str):
      raise ContractError(f"{where}: field 'text' must be a string")
    _check_string(text_field, "text", where)
  boxes = obj.get("boxes")
  if boxes is not None:
    if not isinstance(boxes, list) or not all(
        isinstance(b, list) and len(b) == 4 and all(type(v) in _NUMBER_TYPES for v in b) for b in boxes):
      raise ContractError(f"{where}: field 'boxes' must be a list of [ymin, xmin, ymax, xmax] lists")
    for k, box in enumerate(boxes):
      problem = _float32_problem(box)
      if problem:
        raise ContractError(f"{where}: field 'boxes': box {k} {problem}")
    boxes = tuple(tuple(float(v) for v in b) for b in boxes)
  split = obj.get("split", DEFAULT_SPLIT)
  problem = split_name_problem(split)
  if problem:
    raise ContractError(f"{where}: field 'split' {problem}")
  return ManifestRecord(id=rid, label=label, image=image, video=video, text=text_field,
                        boxes=boxes, tubelets=tubelets, split=split, line=line)


def _class_id(value, field: str, where: str, class_names: tuple[str, ...]) -> int:
  """A label: a non-negative int, or a class name of classes.json."""
  if isinstance(value, str):
    if value not in class_names:
      raise ContractError(f"{where}: {field} names unknown class {value!r}")
    return class_names.index(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ContractError(f"{where}: {field} must be a non-negative int or a class name")
  if value > MAX_LABEL:
    raise ContractError(f"{where}: {field} must be a non-negative int or a class name: {value} is beyond int32 "
                        f"({MAX_LABEL})")
  return value


def _float32_problem(numbers) -> str | None:
  """Why numbers (ints and floats) cannot be stored as float32 values, or None."""
  if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
    return "holds NaN or Infinity"
  if any(abs(v) > FLOAT32_MAX for v in numbers):
    return "holds a value beyond float32"
  return None


def _parse_tubelets(value, where: str, class_names: tuple[str, ...]) -> tuple[Tubelet, ...]:
  """`tubelets`: a list (empty for a clip without actors) of {"label", "boxes"}, each with at least one box."""
  if not isinstance(value, list):
    raise ContractError(f"{where}: field 'tubelets' must be a list of {{\"label\", \"boxes\"}} objects")
  tubelets = []
  for i, tube in enumerate(value):
    at = f"field 'tubelets': tubelet {i}"
    if not isinstance(tube, dict):
      raise ContractError(f"{where}: {at} must be an object with 'label' and 'boxes', got {tube!r}")
    unknown, missing = sorted(set(tube) - _TUBELET_FIELDS), sorted(_TUBELET_FIELDS - set(tube))
    if unknown:
      raise ContractError(f"{where}: {at}: unknown key {unknown[0]!r} (known: {sorted(_TUBELET_FIELDS)})")
    if missing:
      raise ContractError(f"{where}: {at}: missing key {missing[0]!r}")
    label = _class_id(tube["label"], f"{at}: 'label'", where, class_names)
    if not isinstance(tube["boxes"], list) or not tube["boxes"]:
      raise ContractError(f"{where}: {at}: 'boxes' must be a non-empty list of [t, ymin, xmin, ymax, xmax]")
    boxes, frames = [], set()
    for k, box in enumerate(tube["boxes"]):
      problem = _box_problem(box)
      if problem is None and box[0] in frames:
        problem = f"frame {int(box[0])} appears twice in the tubelet"
      if problem is not None:
        raise ContractError(f"{where}: {at}: box {k}: {problem}")
      frames.add(int(box[0]))
      boxes.append((int(box[0]), *(float(v) for v in box[1:])))
    tubelets.append(Tubelet(label, tuple(boxes)))
  return tuple(tubelets)


def _box_problem(box) -> str | None:
  """What is wrong with one [t, ymin, xmin, ymax, xmax] of a tubelet, or None (the rules of the localisation
  evaluator's tube files: t a non-negative integer, 3.0 counting as 3; 0 <= ymin <= ymax <= 1, the same in x)."""
  if not isinstance(box, list) or len(box) != 5 or not all(type(v) in _NUMBER_TYPES for v in box):
    return f"not 5 numbers [t, ymin, xmin, ymax, xmax], got {box!r}"
  t, *coords = box
  if any(isinstance(v, float) and not math.isfinite(v) for v in box):
    return "holds NaN or Infinity"
  if t < 0 or t != math.floor(t):
    return f"frame t = {t!r} is not a non-negative integer"
  if not all(0 <= v <= 1 for v in coords):
    return f"coordinates {coords} not all in [0, 1]"
  ymin, xmin, ymax, xmax = coords
  if ymin > ymax:
    return f"ymin {ymin!r} > ymax {ymax!r}"
  if xmin > xmax:
    return f"xmin {xmin!r} > xmax {xmax!r}"
  return None


def tubelet_frame_error(tubelets: tuple[Tubelet, ...], frames: int) -> str | None:
  """The first box whose t is not a frame of a clip of `frames` frames, as "field 'tubelets': tubelet i: box k:
  ..." (the manifest parser checks frame lists, planning video files), or None."""
  for i, tube in enumerate(tubelets):
    for k, box in enumerate(tube.boxes):
      if box[0] >= frames:
        return (f"field 'tubelets': tubelet {i}: box {k}: frame t = {box[0]} is not in the clip, whose "
                f"{frames} frames are t = 0..{frames - 1}")
  return None


def iter_manifest_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, text) for every non-blank line of a manifest file."""
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, start=1):
      if text.strip():
        yield number, text


def read_manifest(path: str, class_names: tuple[str, ...] = ()) -> list[ManifestRecord]:
  """Reads a whole manifest strictly: the first bad line raises ContractError."""
  return [parse_manifest_line(t, n, path, class_names) for n, t in iter_manifest_lines(path)]
