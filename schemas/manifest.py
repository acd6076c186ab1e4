"""Manifest records (JSONL, one source example per line): the v1 contract of DESIGN.md."""

import dataclasses
import json
from typing import Any, Iterator

from schemas.errors import ContractError

DEFAULT_SPLIT = "train"
_KNOWN_FIELDS = {"id", "image", "video", "text", "label", "boxes", "split"}


@dataclasses.dataclass(frozen=True)
class ManifestRecord:
  id: str
  label: int
  image: str | None = None
  video: tuple[str, ...] | str | None = None
  text: str | None = None
  boxes: tuple[tuple[float, ...], ...] | None = None
  split: str = DEFAULT_SPLIT
  line: int = 0  # 1-based line in the manifest, so later errors can point back at it.

  def to_json(self) -> dict[str, Any]:
    out = {"id": self.id, "label": self.label, "split": self.split}
    if self.image is not None:
      out["image"] = self.image
    if self.video is not None:
      out["video"] = list(self.video) if isinstance(self.video, tuple) else self.video
    if self.text is not None:
      out["text"] = self.text
    if self.boxes is not None:
      out["boxes"] = [list(b) for b in self.boxes]
    return out


def parse_manifest_line(text: str, line: int, source: str = "manifest",
                        class_names: tuple[str, ...] = ()) -> ManifestRecord:
  """Parses and validates one manifest line; raises ContractError naming `source:line` and the field."""
  where = f"{source}:{line}"
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ContractError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(obj, dict):
    raise ContractError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  unknown = sorted(set(obj) - _KNOWN_FIELDS)
  if unknown:
    raise ContractError(f"{where}: unknown field {unknown[0]!r} (known: {sorted(_KNOWN_FIELDS)})")
  rid = obj.get("id")
  if not isinstance(rid, str) or not rid:
    raise ContractError(f"{where}: field 'id' must be a non-empty string")
  where = f"{where} (id {rid!r})"
  image, video = obj.get("image"), obj.get("video")
  if (image is None) == (video is None):
    raise ContractError(f"{where}: exactly one of fields 'image' and 'video' is required")
  if image is not None and (not isinstance(image, str) or not image):
    raise ContractError(f"{where}: field 'image' must be a non-empty path string")
  if video is not None:
    if isinstance(video, list):
      if not video or not all(isinstance(f, str) and f for f in video):
        raise ContractError(f"{where}: field 'video' must be a non-empty list of frame paths")
      video = tuple(video)
    elif not isinstance(video, str) or not video:
      raise ContractError(f"{where}: field 'video' must be a path or a list of frame paths")
  label = obj.get("label")
  if isinstance(label, str):
    if label not in class_names:
      raise ContractError(f"{where}: field 'label' names unknown class {label!r}")
    label = class_names.index(label)
  if isinstance(label, bool) or not isinstance(label, int) or label < 0:
    raise ContractError(f"{where}: field 'label' must be a non-negative int or a class name")
  text_field = obj.get("text")
  if text_field is not None and not isinstance(text_field, str):
    raise ContractError(f"{where}: field 'text' must be a string")
  boxes = obj.get("boxes")
  if boxes is not None:
    if not isinstance(boxes, list) or not all(
        isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b) for b in boxes):
      raise ContractError(f"{where}: field 'boxes' must be a list of [ymin, xmin, ymax, xmax] lists")
    boxes = tuple(tuple(float(v) for v in b) for b in boxes)
  split = obj.get("split", DEFAULT_SPLIT)
  if not isinstance(split, str) or not split or "/" in split:
    raise ContractError(f"{where}: field 'split' must be a non-empty string without '/'")
  return ManifestRecord(id=rid, label=label, image=image, video=video, text=text_field,
                        boxes=boxes, split=split, line=line)


def iter_manifest_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, text) for every non-blank line of a manifest file."""
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, start=1):
      if text.strip():
        yield number, text


def read_manifest(path: str, class_names: tuple[str, ...] = ()) -> list[ManifestRecord]:
  """Reads a whole manifest strictly: the first bad line raises ContractError."""
  return [parse_manifest_line(t, n, path, class_names) for n, t in iter_manifest_lines(path)]
