import json
import re

import pytest

from schemas.errors import ContractError
from schemas.manifest import Tubelet, parse_manifest_line, read_manifest


def test_valid_record_defaults_split_to_train():
  r = parse_manifest_line('{"id": "a", "image": "x.png", "label": 2, "text": "hi"}', 1)
  assert (r.id, r.image, r.label, r.split, r.text, r.line) == ("a", "x.png", 2, "train", "hi", 1)


def test_class_name_label_maps_to_index():
  r = parse_manifest_line('{"id": "a", "image": "x.png", "label": "blue"}', 1, class_names=("red", "blue"))
  assert r.label == 1


@pytest.mark.parametrize("line, message", [
    ("{not json", "m.jsonl:7: not valid JSON"),
    ("[1, 2]", "m.jsonl:7: expected a JSON object"),
    ('{"image": "x.png", "label": 1}', "field 'id'"),
    ('{"id": "a", "label": 1}', "exactly one of fields 'image' and 'video'"),
    ('{"id": "a", "image": "x.png", "label": -1}', "field 'label'"),
    ('{"id": "a", "image": "x.png", "label": true}', "field 'label'"),
    ('{"id": "a", "image": "x.png", "label": "purple"}', "unknown class 'purple'"),
    ('{"id": "a", "image": "x.png", "label": 1, "colour": 3}', "unknown field 'colour'"),
    ('{"id": "a", "image": "x.png", "label": 1, "boxes": [[1, 2]]}', "field 'boxes'"),
])
def test_bad_records_name_line_and_field(line, message):
  with pytest.raises(ContractError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
    parse_manifest_line(line, 7, "m.jsonl", class_names=("red",))
  assert "m.jsonl:7" in str(e.value)


def test_read_manifest_skips_blank_lines_and_keeps_line_numbers(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text(json.dumps({"id": "a", "image": "a.png", "label": 0}) + "\n\n" +
                  json.dumps({"id": "b", "image": "b.png", "label": 1, "split": "val"}) + "\n")
  records = read_manifest(str(path))
  assert [(r.id, r.line, r.split) for r in records] == [("a", 1, "train"), ("b", 3, "val")]


def _clip(tubelets, **fields):
  return json.dumps({"id": "c", "video": "c.mp4", "tubelets": tubelets, **fields})


def test_tubelets_parse_with_class_names_integral_frames_and_no_clip_label():
  r = parse_manifest_line(_clip([{"label": "blue", "boxes": [[3.0, 0.1, 0.2, 0.5, 0.6], [5, 0, 0, 1, 1]]},
                                 {"label": 0, "boxes": [[0, 0.5, 0.5, 0.5, 0.5]]}]), 4, class_names=("red", "blue"))
  assert r.label is None
  assert r.tubelets == (Tubelet(1, ((3, 0.1, 0.2, 0.5, 0.6), (5, 0.0, 0.0, 1.0, 1.0))),
                        Tubelet(0, ((0, 0.5, 0.5, 0.5, 0.5),)))
  assert isinstance(r.tubelets[0].boxes[0][0], int)
  assert parse_manifest_line(json.dumps(r.to_json()), 4) == r  # to_json round-trips, without a clip label
  assert parse_manifest_line(_clip([], label=2), 1).tubelets == ()  # a clip without actors


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "image": "x.png", "label": 1, "tubelets": []}', "field 'tubelets' needs field 'video'"),
    (_clip({"label": 0}), "field 'tubelets' must be a list"),
    (_clip([[0, 0, 0, 1, 1]]), "field 'tubelets': tubelet 0 must be an object with 'label' and 'boxes'"),
    (_clip([{"label": 0, "boxes": [[0, 0, 0, 1, 1]], "score": 1}]), "tubelet 0: unknown key 'score'"),
    (_clip([{"label": 0}]), "tubelet 0: missing key 'boxes'"),
    (_clip([{"label": 0, "boxes": [[0, 0, 0, 1, 1]]}, {"label": -1, "boxes": [[0, 0, 0, 1, 1]]}]),
     "tubelet 1: 'label' must be a non-negative int or a class name"),
    (_clip([{"label": True, "boxes": [[0, 0, 0, 1, 1]]}]), "tubelet 0: 'label' must be a non-negative int"),
    (_clip([{"label": "purple", "boxes": [[0, 0, 0, 1, 1]]}]), "tubelet 0: 'label' names unknown class 'purple'"),
    (_clip([{"label": 0, "boxes": []}]), "tubelet 0: 'boxes' must be a non-empty list"),
    (_clip([{"label": 0, "boxes": [[0, 0, 1, 1]]}]), "tubelet 0: box 0: not 5 numbers"),
    (_clip([{"label": 0, "boxes": [[0, 0, 0, 1, "1"]]}]), "tubelet 0: box 0: not 5 numbers"),
    (_clip([{"label": 0, "boxes": [[0, 0, 0, 1, 1], [1, False, 0, 1, 1]]}]), "tubelet 0: box 1: not 5 numbers"),
    (_clip([{"label": 0, "boxes": [[0, 0, 0, 1, 1], [1, float("nan"), 0, 1, 1]]}]), "box 1: holds NaN or Infinity"),
    (_clip([{"label": 0, "boxes": [[float("inf"), 0, 0, 1, 1]]}]), "box 0: holds NaN or Infinity"),
    (_clip([{"label": 0, "boxes": [[-1, 0, 0, 1, 1]]}]), "box 0: frame t = -1 is not a non-negative integer"),
    (_clip([{"label": 0, "boxes": [[1.5, 0, 0, 1, 1]]}]), "box 0: frame t = 1.5 is not a non-negative integer"),
    (_clip([{"label": 0, "boxes": [[0, 0, 0, 1, 1.25]]}]), "box 0: coordinates [0, 0, 1, 1.25] not all in [0, 1]"),
    (_clip([{"label": 0, "boxes": [[0, -0.1, 0, 1, 1]]}]), "box 0: coordinates [-0.1, 0, 1, 1] not all in [0, 1]"),
    (_clip([{"label": 0, "boxes": [[0, 0.5, 0, 0.2, 1]]}]), "box 0: ymin 0.5 > ymax 0.2"),
    (_clip([{"label": 0, "boxes": [[0, 0, 0.7, 1, 0.6]]}]), "box 0: xmin 0.7 > xmax 0.6"),
    (_clip([{"label": 0, "boxes": [[2, 0, 0, 1, 1], [3, 0, 0, 1, 1], [2.0, 0, 0, 1, 1]]}]),
     "tubelet 0: box 2: frame 2 appears twice in the tubelet"),
    (json.dumps({"id": "c", "video": ["f0.png", "f1.png", "f2.png"],
                 "tubelets": [{"label": 0, "boxes": [[2, 0, 0, 1, 1], [3, 0, 0, 1, 1]]}]}),
     "tubelet 0: box 1: frame t = 3 is not in the clip, whose 3 frames are t = 0..2"),
    ('{"id": "a", "video": "c.mp4"}', "field 'label' must be a non-negative int"),  # no tubelets: a label is due
])
def test_bad_tubelets_name_line_and_field(line, message):
  with pytest.raises(ContractError, match=re.escape(message)) as e:
    parse_manifest_line(line, 7, "m.jsonl", class_names=("red",))
  assert str(e.value).startswith("m.jsonl:7 (id ")
  assert "field 'tubelets'" in str(e.value) or "field 'label'" in str(e.value)


def _record(**fields):
  return json.dumps({"id": "a", "image": "x.png", "label": 1, **fields})


@pytest.mark.parametrize("line, message", [
    (_record(split=".."), "field 'split' must be 1 to 64 of A-Z a-z 0-9 _ . - (not starting with '.'), got '..'"),
    (_record(split="."), "field 'split' must be"),
    (_record(split=".hidden"), "field 'split' must be"),
    (_record(split="a/b"), "field 'split' must be"),
    (_record(split="..\\x"), "field 'split' must be"),
    (_record(split="tr\x00ain"), "got 'tr\\x00ain'"),
    (_record(split="s" * 300), "field 'split' must be 1 to 64"),
    (_record(split=""), "field 'split' must be"),
    (_record(split=3), "field 'split' must be"),
    (_record(label=2 ** 31), "field 'label' must be a non-negative int or a class name: 2147483648 is beyond int32"),
    (_record(label=10 ** 30), "a class name: 1000000000000000000000000000000 is beyond int32"),
    (_record(text="\ud800"), "field 'text' is not valid Unicode (a lone surrogate)"),
    (json.dumps({"id": "\udfff", "image": "x.png", "label": 0}), "field 'id' is not valid Unicode"),
    (_record(image="x\x00.png"), "field 'image' holds a NUL character"),
    (_record(image="\ud800.png"), "field 'image' is not valid Unicode"),
    (json.dumps({"id": "a", "video": ["f.png", "g\x00.png"], "label": 0}), "field 'video' holds a NUL character"),
    (_record(boxes=[[0, 0, float("nan"), 1]]), "field 'boxes': box 0 holds NaN or Infinity"),
    (_record(boxes=[[0, 0, 1, 1], [float("-inf"), 0, 1, 1]]), "field 'boxes': box 1 holds NaN or Infinity"),
    ('{"id": "a", "image": "x.png", "label": 1, "boxes": [[0, 0, 1, 1e400]]}', "box 0 holds NaN or Infinity"),
    (_record(boxes=[[0, 0, 1, 1e39]]), "box 0 holds a value beyond float32"),
    (_record(boxes=[[0, 0, 1, 10 ** 400]]), "box 0 holds a value beyond float32"),
    (_record(boxes=[[0, 0, True, 1]]), "field 'boxes' must be a list of [ymin, xmin, ymax, xmax] lists"),
    (_clip([{"label": 2 ** 31, "boxes": [[0, 0, 0, 1, 1]]}]),
     "tubelet 0: 'label' must be a non-negative int or a class name: 2147483648 is beyond int32"),
    (_clip([{"label": 0, "boxes": [[0, 0, 0, 1, float("nan")]]}]), "tubelet 0: box 0: holds NaN or Infinity"),
    ('{"id": "a", "image": "x.png", "label": 1' + "0" * 5000 + "}", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "not valid JSON (nested too deeply)"),
])
def test_fields_are_checked_where_they_are_parsed(line, message):
  with pytest.raises(ContractError, match=re.escape(message)) as e:
    parse_manifest_line(line, 7, "m.jsonl")
  assert str(e.value).startswith("m.jsonl:7") and "\n" not in str(e.value)


def test_the_largest_int32_label_and_safe_split_names_are_accepted():
  r = parse_manifest_line(_record(label=2 ** 31 - 1, split="test-noise1.v2_x"), 1)
  assert (r.label, r.split) == (2 ** 31 - 1, "test-noise1.v2_x")
  assert parse_manifest_line(_record(split="s" * 64), 1).split == "s" * 64
