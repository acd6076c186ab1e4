"""Hostile manifests through the real shard builder: every bad record is one error row with its reason, every
good one is kept, the job stays up and nothing is written outside the output directory."""

import json
import os
import random
import threading
import time

import pytest

from beam_jobs.build_shards import build_shards
from beam_jobs.options import ShardOptions
from schemas.shards import load_split


def _tree(root, skip):
  """Every path under root (files and folders) with its size, except those under `skip`."""
  out = {}
  for folder, dirs, names in os.walk(root):
    if folder.startswith(str(skip)):
      continue
    for name in dirs + names:
      path = os.path.join(folder, name)
      out[path] = None if os.path.isdir(path) else os.path.getsize(path)
  return out


class Corpus:
  """Files the hostile records point at, beside good images: a FIFO, a device, a folder, an empty file, a text
  file and a file one byte over the cap."""

  def __init__(self, root, synthetic_dir):
    records = [json.loads(l) for l in (synthetic_dir / "manifest.jsonl").read_text().splitlines()]
    self.images = [str(synthetic_dir / r["image"]) for r in records if r["split"] == "train"]
    self.max_file_bytes = max(os.path.getsize(p) for p in self.images) + 1000
    files = root / "files"
    files.mkdir()
    os.mkfifo(files / "pipe.png")
    (files / "folder.png").mkdir()
    (files / "empty.png").write_bytes(b"")
    (files / "text.png").write_text("not an image")
    (files / "huge.png").write_bytes(b"\x89PNG" + bytes(self.max_file_bytes - 3))
    self.files = files

  def path(self, name):
    return "/dev/zero" if name == "zero" else str(self.files / name)


def _good(i, image, split="train"):
  return {"id": f"good-{i}", "image": image, "label": i % 6, "split": split, "text": f"caption {i}"}


# The records of issue 19, one per kind: (record or raw line, reason).
def _issue_cases(corpus):
  image = corpus.images[0]
  return [
      ({"id": "up", "image": image, "label": 0, "split": ".."}, "invalid_record"),
      ({"id": "up2", "image": image, "label": 0, "split": "../../escaped"}, "invalid_record"),
      ({"id": "nul", "image": image, "label": 0, "split": "tr\x00ain"}, "invalid_record"),
      ({"id": "long", "image": image, "label": 0, "split": "s" * 300}, "invalid_record"),
      ({"id": "big-label", "image": image, "label": 2147483648}, "invalid_record"),
      ({"id": "surrogate", "image": image, "label": 0, "text": "\ud800"}, "invalid_record"),
      ({"id": "nan", "image": image, "label": 0, "boxes": [[0, 0, float("nan"), 1]]}, "invalid_record"),
      ({"id": "zero", "image": "/dev/zero", "label": 0}, "not_a_file"),
      ({"id": "fifo", "image": corpus.path("pipe.png"), "label": 0}, "not_a_file"),
      ({"id": "huge", "image": corpus.path("huge.png"), "label": 0}, "file_too_large"),
  ]


def _line(record):
  return record if isinstance(record, str) else json.dumps(record)


def _build(manifest_lines, root, corpus, timeout=120):
  """Runs the builder on a thread, so a read that blocks fails the test instead of hanging it."""
  manifest = root / "data" / "manifest.jsonl"
  manifest.parent.mkdir()
  manifest.write_bytes(b"".join(l.encode("utf-8", "surrogatepass") + b"\n" for l in manifest_lines))
  out = root / "data" / "deep" / "out"  # a split of '..' or '../..' would land in data/deep or data
  out.mkdir(parents=True)
  before = _tree(root, out)
  result = {}
  options = ShardOptions(seq_len=128, patch_size=16, max_images=8, max_patches_per_image=32, num_shards=2,
                         text_len=16, max_error_fraction=1, max_file_bytes=corpus.max_file_bytes)
  worker = threading.Thread(target=lambda: result.update(info=build_shards(str(manifest), str(out), options)),
                            daemon=True)
  start = time.monotonic()
  worker.start()
  worker.join(timeout)
  assert not worker.is_alive(), f"the build did not finish in {timeout} s"
  assert "info" in result, "the build failed"
  assert _tree(root, out) == before  # nothing written, moved or removed outside the output directory
  errors = [json.loads(l) for l in (out / "errors.jsonl").read_text().splitlines()]
  return out, result["info"], errors, time.monotonic() - start


def _kept_ids(out, info):
  ids = []
  for split in info["splits"]:
    example_ids = load_split(str(out), split, info, fields=("example_ids",))["example_ids"]
    ids += [rid.decode() for rid in example_ids.reshape(-1) if rid]
  return ids


def test_the_issue_records_are_error_rows_and_the_good_ones_are_kept(tmp_path, synthetic_dir):
  corpus = Corpus(tmp_path, synthetic_dir)
  good = [_good(i, image) for i, image in enumerate(corpus.images[:12])]
  bad = _issue_cases(corpus)
  lines = [_line(r) for r in good[:6]] + [_line(r) for r, _ in bad] + [_line(r) for r in good[6:]]
  out, info, errors, _ = _build(lines, tmp_path, corpus)
  assert [(e["line"], e["reason"]) for e in errors] == [(7 + i, reason) for i, (_, reason) in enumerate(bad)]
  assert sorted(_kept_ids(out, info)) == sorted(r["id"] for r in good)
  assert os.listdir(out) and sorted(os.listdir(out)) == sorted(["dataset_info.json", "errors.jsonl",
                                                                "lineage.json", "train"])


# ------------------------------------------------------------------------------------------------ the fuzzer

def _garbage(rng):
  alphabet = "{}[]\":,.0123456789eE+-truefalsenul abcxyz\\\t\x00\x7f\u00e9\u2028"
  return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))


def _mutants(rng, corpus, i):
  """One malformed line and the reason the builder must give it; `i` makes its id unique."""
  image = rng.choice(corpus.images)
  base = {"id": f"bad-{i}", "image": image, "label": rng.randint(0, 5)}

  def with_(**fields):
    return {**base, **fields}

  def without(*names):
    return {k: v for k, v in base.items() if k not in names}

  kinds = [
      # not JSON at all, or not JSON Python can take
      lambda: ("{" + _garbage(rng) + "{", "not_json"),  # an open brace last: never valid JSON
      lambda: (json.dumps(base)[:rng.randint(1, len(json.dumps(base)) - 1)], "not_json"),
      lambda: ("[" * rng.randint(3000, 30000), "not_json"),
      lambda: ('{"id": "x", "label": 1' + "0" * rng.randint(4400, 9000) + "}", "not_json"),
      lambda: ("\udcff\udcfe" + _garbage(rng), "not_json"),  # bytes that are not UTF-8
      # JSON, but not a record
      lambda: (json.dumps(rng.choice([1, -2.5, "text", None, True, [1, 2], []])), "invalid_record"),
      lambda: (with_(colour="red"), "invalid_record"),
      lambda: (without("id"), "invalid_record"),
      lambda: (with_(id=rng.choice(["", 5, None, ["a"], "\ud800", "a\udfffb"])), "invalid_record"),
      lambda: (without("image"), "no_image"),
      lambda: (with_(image=None), "no_image"),
      lambda: (with_(image=rng.choice(["", 7, ["x.png"], {"p": 1}, "a\x00.png", "\ud800.png"])), "invalid_record"),
      lambda: (with_(video=[image]), "invalid_record"),  # both image and video
      lambda: (with_(split=rng.choice(["..", ".", "../x", "../../x", "a/b", "/abs", "a\\b", "\x00", "", ".hidden",
                                       "s" * rng.randint(65, 400), 3, None, ["train"], "tr ain", "\u00e9t\u00e9"])),
               "invalid_record"),
      lambda: (with_(label=rng.choice([-1, -(2 ** 40), 2 ** 31, 2 ** 63, 1.5, True, None, "purple", [1]])),
               "invalid_record"),
      lambda: (with_(text=rng.choice([5, ["a"], "\ud800", "ok \udfff"])), "invalid_record"),
      lambda: (with_(boxes=rng.choice([[[0, 0, float("nan"), 1]], [[float("inf"), 0, 1, 1]], [[0, 0, 1, 1e39]],
                                        [[0, 0, 1]], [["0", 0, 1, 1]], [[0, 0, True, 1]], "boxes", [1, 2, 3, 4]])),
               "invalid_record"),
      lambda: (with_(tubelets=[{"label": 0, "boxes": [[0, 0, 0, 1, 1]]}]), "invalid_record"),
      # a record whose file is not a readable image
      lambda: (with_(image=corpus.path("missing.png")), "missing_file"),
      lambda: (with_(image=corpus.path(rng.choice(["pipe.png", "folder.png", "zero"]))), "not_a_file"),
      lambda: (with_(image=corpus.path("huge.png")), "file_too_large"),
      lambda: (with_(image=corpus.path("empty.png")), "empty_file"),
      lambda: (with_(image=corpus.path("text.png")), "not_an_image"),
      lambda: ({**without("image"), "video": [image, image]}, "unsupported_video"),
  ]
  record, reason = rng.choice(kinds)()
  return _line(record), reason


@pytest.mark.slow
def test_fuzzed_manifest_lines_are_each_one_error_row_and_every_good_line_is_kept(tmp_path, synthetic_dir):
  rng = random.Random(19)
  corpus = Corpus(tmp_path, synthetic_dir)
  lines, expected, good_ids = [], {}, []
  num_bad, num_good = 0, 0
  while num_bad < 240 or num_good < 80:
    number = len(lines) + 1
    if good_ids and rng.random() < 0.03:  # an id seen on an earlier (good) line: the first line wins
      lines.append(json.dumps(_good(0, rng.choice(corpus.images)) | {"id": rng.choice(good_ids)}))
      expected[number] = "duplicate_id"
      num_bad += 1
    elif num_good < 80 and (num_bad >= 240 or rng.random() < 0.25):
      record = _good(num_good, corpus.images[num_good % len(corpus.images)], rng.choice(["train", "val"]))
      lines.append(json.dumps(record))
      good_ids.append(record["id"])
      num_good += 1
    else:
      line, expected[number] = _mutants(rng, corpus, number)
      assert "\n" not in line
      lines.append(line)
      num_bad += 1
  out, info, errors, seconds = _build(lines, tmp_path, corpus)
  got = {e["line"]: e["reason"] for e in errors}
  assert len(got) == len(errors)  # one row per bad line
  assert got == expected
  assert sorted(_kept_ids(out, info)) == sorted(good_ids)
  assert info["num_manifest_lines"] == len(lines) and info["num_errors"] == num_bad
  assert len(set(expected.values())) >= 10 and seconds < 120
