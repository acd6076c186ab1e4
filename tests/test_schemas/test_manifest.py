import json

import pytest

from schemas.errors import ContractError
from schemas.manifest import parse_manifest_line, read_manifest


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
