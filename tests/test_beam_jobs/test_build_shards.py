import hashlib
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from beam_jobs import image_ops
from beam_jobs.build_shards import build_shards, pipeline_runner
from beam_jobs.options import ShardOptions
from schemas.dataset_info import packed_spec, read_dataset_info
from schemas.errors import ContractError

OPTIONS = ShardOptions(seq_len=128, patch_size=16, max_images=8, max_patches_per_image=32, num_shards=2)


def _read_shards(shard_dir):
  info = read_dataset_info(str(shard_dir))
  spec = packed_spec(info)
  for shard in info["shards"]:
    for record in tf.data.TFRecordDataset(os.path.join(str(shard_dir), shard["path"])):
      yield shard, {k: v.numpy() for k, v in spec.tf_parse(record).items()}


def _slots(ex):
  for slot, rid in enumerate(ex["example_ids"]):
    if rid:
      yield slot, rid.decode(), ex["segment_ids"] == slot + 1


def test_tensorflow_reads_shards_and_patches_reassemble_to_the_resized_image(synthetic_dir, shard_dir):
  info = read_dataset_info(str(shard_dir))
  manifest = {json.loads(l)["id"]: json.loads(l) for l in open(synthetic_dir / "manifest.jsonl")}
  seen = set()
  for shard, ex in _read_shards(shard_dir):
    assert (ex["labels"][ex["example_ids"] == b""] == -1).all()
    for slot, rid, mask in _slots(ex):
      seen.add(rid)
      rows, cols = ex["image_grid"][slot]
      assert mask.sum() == rows * cols
      np.testing.assert_array_equal(ex["patch_yx"][mask], image_ops.patchify(np.zeros((rows * 16, cols * 16, 3),
                                                                                      np.uint8), 16)[1])
      image = image_ops.unpatchify(ex["patches"][mask], rows, cols, 16)
      source = image_ops.decode_rgb((synthetic_dir / manifest[rid]["image"]).read_bytes())
      np.testing.assert_array_equal(image, image_ops.resize_to_grid(source, rows, cols, 16))
      assert ex["labels"][slot] == manifest[rid]["label"]
      assert shard["split"] == manifest[rid]["split"]
    assert (ex["patches"][ex["segment_ids"] == 0] == 0).all()
  assert seen == set(manifest)
  for shard in info["shards"]:  # the recorded digest is the file's, whole and nothing after it
    assert hashlib.sha256((shard_dir / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
  assert info["num_examples"] == len(manifest) and info["num_errors"] == 0
  assert 0 < info["packing_efficiency"] <= 1
  assert sum(info["histograms"]["images_per_sequence"]["counts"]) == info["num_sequences"]
  assert sum(info["histograms"]["tokens_per_image"]["counts"]) == info["num_examples"]
  assert info["options"]["max_patches_per_image"] == 32 and info["tokens_dropped"] == 0


def _same_shards(a, b):
  first, second = read_dataset_info(str(a))["shards"], read_dataset_info(str(b))["shards"]
  assert [(s["path"], s["sha256"]) for s in first] == [(s["path"], s["sha256"]) for s in second]
  for s in first:
    assert (a / s["path"]).read_bytes() == (b / s["path"]).read_bytes()


def test_one_and_two_workers_give_byte_identical_shards(synthetic_dir, shard_dir, tmp_path):
  build_shards(str(synthetic_dir / "manifest.jsonl"), str(tmp_path), OPTIONS, workers=2)  # two worker threads
  _same_shards(shard_dir, tmp_path)
  assert (shard_dir / "dataset_info.json").read_bytes() == (tmp_path / "dataset_info.json").read_bytes()
  assert (shard_dir / "errors.jsonl").read_bytes() == (tmp_path / "errors.jsonl").read_bytes()
  assert not [p for p in tmp_path.rglob("*.tmp*")]


def test_synthetic_source_gives_the_same_shards_as_its_manifest(shard_dir, tmp_path):
  spec = "synthetic:seed=3,train=48,val=24,test=12,noise=2"  # what conftest's synthetic_dir generates
  build_shards(spec, str(tmp_path), OPTIONS)
  _same_shards(shard_dir, tmp_path)


def test_a_rebuild_with_fewer_shards_leaves_no_stale_files(synthetic_dir, tmp_path):
  manifest = str(synthetic_dir / "manifest.jsonl")
  build_shards(manifest, str(tmp_path), ShardOptions(seq_len=128, max_patches_per_image=32, num_shards=3))
  (tmp_path / "train" / "shard-00000-of-00003.tfrecord.tmp-killedrun").write_bytes(b"half")
  info = build_shards(manifest, str(tmp_path), ShardOptions(seq_len=128, max_patches_per_image=32, num_shards=2))
  on_disk = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("shard-*"))
  assert on_disk == sorted(s["path"] for s in info["shards"])
  assert {s["path"].split("/")[1] for s in info["shards"]} <= {"shard-00000-of-00002.tfrecord",
                                                               "shard-00001-of-00002.tfrecord",
                                                               "shard-00000-of-00001.tfrecord"}


def _png(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _jpeg(pixels, **kw):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", **kw)
  return buffer.getvalue()


def _manifest_with_every_bad_kind(tmp_path, synthetic_dir):
  lines = (synthetic_dir / "manifest.jsonl").read_text().splitlines()
  good = [json.loads(l) for l in lines[:20]]
  for rec in good:
    rec["image"] = str(synthetic_dir / rec["image"])
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "text.png").write_bytes(b"this is a text file, not an image")
  (tmp_path / "truncated.jpg").write_bytes(_jpeg(noise)[:1500])
  corrupt = bytearray(_png(noise))
  corrupt[200:260] = bytes(60)  # inside the pixel data: the header still reads
  (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
  (tmp_path / "a_directory.png").mkdir()
  rows = [json.dumps(r) for r in good]
  bad = [
      "{this is not json",                                                                       # line 21
      json.dumps({"id": "noimage", "label": 0}),                                                 # 22
      json.dumps({"id": "badlabel", "image": good[0]["image"], "label": -3}),                    # 23
      json.dumps({"id": "ghost", "image": str(tmp_path / "missing.png"), "label": 0}),           # 24
      json.dumps({"id": "dir", "image": str(tmp_path / "a_directory.png"), "label": 0}),         # 25
      json.dumps({"id": "empty", "image": str(tmp_path / "empty.png"), "label": 0}),             # 26
      json.dumps({"id": "text", "image": str(tmp_path / "text.png"), "label": 0}),               # 27
      json.dumps({"id": "truncated", "image": str(tmp_path / "truncated.jpg"), "label": 0}),     # 28
      json.dumps({"id": "corrupt", "image": str(tmp_path / "corrupt.png"), "label": 0}),         # 29
      json.dumps({"id": "clip", "video": [good[1]["image"]], "label": 0}),                       # 30
      json.dumps(good[0]),                                                                       # 31: duplicate id
  ]
  path = tmp_path / "manifest.jsonl"
  path.write_text("\n".join(rows + bad) + "\n")
  return path


EXPECTED_ERRORS = [
    (21, None, "not_json"), (22, "noimage", "no_image"), (23, "badlabel", "invalid_record"),
    (24, "ghost", "missing_file"), (25, "dir", "not_a_file"), (26, "empty", "empty_file"),
    (27, "text", "not_an_image"), (28, "truncated", "truncated_image"), (29, "corrupt", "undecodable_image"),
    (30, "clip", "unsupported_video"), (31, "test-00000", "duplicate_id"),  # line 1's id again
]


def test_every_kind_of_bad_input_goes_to_errors_jsonl_and_the_job_finishes(tmp_path, synthetic_dir):
  manifest = _manifest_with_every_bad_kind(tmp_path, synthetic_dir)
  out = tmp_path / "out"
  info = build_shards(str(manifest), str(out), ShardOptions(seq_len=128, max_patches_per_image=32,
                                                            max_error_fraction=0.5))
  errors = [json.loads(l) for l in (out / "errors.jsonl").read_text().splitlines()]
  assert [(e["line"], e["id"], e["reason"]) for e in errors] == EXPECTED_ERRORS
  for e in errors:
    assert set(e) == {"line", "id", "reason", "detail"} and e["detail"] and "\n" not in e["detail"]
    assert " at 0x" not in e["detail"]  # deterministic text
  assert "not valid JSON" in errors[0]["detail"] and "missing.png" in errors[3]["detail"]
  assert "first seen on line 1" in errors[-1]["detail"]
  assert info["num_errors"] == len(EXPECTED_ERRORS) and info["num_manifest_lines"] == 31
  assert info["errors_by_reason"] == {reason: 1 for _, _, reason in EXPECTED_ERRORS}
  assert info["num_examples"] == 20  # the truncated and corrupt images were found while planning
  ids = {rid for _, ex in _read_shards(out) for _, rid, _ in _slots(ex)}
  assert ids == {json.loads(l)["id"] for l in (synthetic_dir / "manifest.jsonl").read_text().splitlines()[:20]}


def test_truncated_images_are_quarantined_before_packing_so_sequences_are_whole(tmp_path, synthetic_dir):
  lines = (synthetic_dir / "manifest.jsonl").read_text().splitlines()[:24]
  good = [json.loads(l) for l in lines]
  for rec in good:
    rec["image"] = str(synthetic_dir / rec["image"])
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  jpeg, png = _jpeg(noise), _png(noise)
  (tmp_path / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  (tmp_path / "cut.png").write_bytes(png[:len(png) - 100])  # most pixels there, the end cut off
  bad = {5: {"id": "cut-jpeg", "image": str(tmp_path / "cut.jpg"), "label": 0},
         17: {"id": "cut-png", "image": str(tmp_path / "cut.png"), "label": 1}}
  rows = list(good)
  for line in sorted(bad):
    rows.insert(line - 1, bad[line])
  (tmp_path / "dirty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "clean.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
  options = ShardOptions(seq_len=128, max_images=8, max_patches_per_image=32, num_shards=2, max_error_fraction=0.5)
  info = build_shards(str(tmp_path / "dirty.jsonl"), str(tmp_path / "dirty"), options)
  errors = [json.loads(l) for l in (tmp_path / "dirty" / "errors.jsonl").read_text().splitlines()]
  assert [(e["line"], e["id"], e["reason"]) for e in errors] == [(5, "cut-jpeg", "truncated_image"),
                                                                 (17, "cut-png", "truncated_image")]
  assert "cut.jpg" in errors[0]["detail"] and "cut.png" in errors[1]["detail"]
  assert info["num_examples"] == len(good) and info["num_manifest_lines"] == len(rows)
  # Packing never saw the bad files: the shards are those of the manifest without them, byte for byte.
  build_shards(str(tmp_path / "clean.jsonl"), str(tmp_path / "clean"), options)
  _same_shards(tmp_path / "clean", tmp_path / "dirty")
  by_id = {r["id"]: r for r in good}
  written = []
  for _, ex in _read_shards(tmp_path / "dirty"):
    slots = list(_slots(ex))
    assert sorted(set(ex["segment_ids"].tolist()) - {0}) == list(range(1, len(slots) + 1))
    for slot, rid, mask in slots:
      written.append(rid)
      rows_, cols = ex["image_grid"][slot]
      source = image_ops.decode_rgb(open(by_id[rid]["image"], "rb").read())
      np.testing.assert_array_equal(image_ops.unpatchify(ex["patches"][mask], rows_, cols, 16),
                                    image_ops.resize_to_grid(source, rows_, cols, 16))
  assert sorted(written) == sorted(by_id)


def test_too_many_errors_fail_with_a_clear_message_after_writing_the_report(tmp_path, synthetic_dir):
  manifest = _manifest_with_every_bad_kind(tmp_path, synthetic_dir)
  out = tmp_path / "out"
  with pytest.raises(ContractError, match=r"^11 of 31 manifest records failed \(max_error_fraction 0.01\); "
                                          r"first: .*manifest.jsonl:21: not_json: not valid JSON .*errors.jsonl; "
                                          r"nothing was published\)$"):
    build_shards(str(manifest), str(out), ShardOptions(seq_len=128, max_patches_per_image=32))
  assert len((out / "errors.jsonl").read_text().splitlines()) == 11
  with pytest.raises(ContractError, match="dataset_info.json: not found"):  # a failed build is not a dataset
    read_dataset_info(str(out))


def test_odd_images_are_converted_scaled_and_reassemble(tmp_path):
  rng = np.random.default_rng(0)
  smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((100, 100, 1))).astype(np.uint8)  # 1200 x 1600
  images = {
      "huge.png": _png(smooth),
      "tiny.png": _png(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)),
      "gray16.png": None, "cmyk.jpg": None, "palette.gif": None, "rotated.jpg": None, "rgba.png": None,
  }
  buffer = io.BytesIO()
  Image.fromarray((rng.integers(0, 65536, (40, 30))).astype(np.uint16)).save(buffer, format="PNG")
  images["gray16.png"] = buffer.getvalue()
  buffer = io.BytesIO()
  Image.fromarray(smooth[:300, :200]).convert("CMYK").save(buffer, format="JPEG")
  images["cmyk.jpg"] = buffer.getvalue()
  buffer = io.BytesIO()
  Image.fromarray(smooth[:64, :96]).convert("P").save(buffer, format="GIF")
  images["palette.gif"] = buffer.getvalue()
  exif = Image.Exif()
  exif[0x0112] = 6
  images["rotated.jpg"] = _jpeg(smooth[:160, :320], exif=exif.tobytes())
  buffer = io.BytesIO()
  Image.fromarray(np.dstack([smooth[:48, :48], np.full((48, 48), 9, np.uint8)])).save(buffer, format="PNG")
  images["rgba.png"] = buffer.getvalue()
  lines = []
  for i, (name, data) in enumerate(sorted(images.items())):
    (tmp_path / name).write_bytes(data)
    lines.append(json.dumps({"id": name, "image": name, "label": i}))
  (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
  options = ShardOptions(seq_len=256, patch_size=16, max_images=8, max_patches_per_image=64, num_shards=1)
  info = build_shards(str(tmp_path / "manifest.jsonl"), str(tmp_path / "out"), options)
  assert info["num_errors"] == 0 and info["num_examples"] == len(images)
  grids = {}
  for _, ex in _read_shards(tmp_path / "out"):
    for slot, rid, mask in _slots(ex):
      rows, cols = ex["image_grid"][slot]
      grids[rid] = (rows, cols)
      source = image_ops.decode_rgb(images[rid], (rows * 16, cols * 16))
      expected = image_ops.resize_to_grid(source, rows, cols, 16)
      np.testing.assert_array_equal(image_ops.unpatchify(ex["patches"][mask], rows, cols, 16), expected)
  assert grids["tiny.png"] == (1, 1)                  # scaled up to one patch
  assert grids["huge.png"] == (7, 9)                  # 1200x1600 down to <= 64 patches, aspect 3:4 within a patch
  assert grids["rotated.jpg"][0] > grids["rotated.jpg"][1]  # stored landscape, EXIF says portrait
  assert grids["gray16.png"] == (2, 2) and grids["rgba.png"] == (3, 3)


def _video_manifest(tmp_path, frames=3):
  rng = np.random.default_rng(1)
  paths = []
  for t in range(frames):
    pixels = np.full((32, 48, 3), 40 * t, np.uint8)
    pixels[:, :, 2] = rng.integers(0, 256, (32, 48))
    (tmp_path / f"f{t}.png").write_bytes(_png(pixels))
    paths.append(f"f{t}.png")
  (tmp_path / "still.png").write_bytes(_png(np.full((16, 16, 3), 7, np.uint8)))
  boxes = [[0.1, 0.2, 0.5, 0.6], [0.15, 0.2, 0.55, 0.6], [0.2, 0.2, 0.6, 0.6]][:frames]
  rows = [{"id": "clip", "video": paths, "label": 1, "boxes": boxes, "text": "a clip"},
          {"id": "still", "image": "still.png", "label": 0, "text": "a still"}]
  (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return tmp_path / "manifest.jsonl", boxes


def test_video_frames_get_patch_t_and_tubelet_boxes_travel_with_the_example(tmp_path):
  manifest, boxes = _video_manifest(tmp_path)
  options = ShardOptions(seq_len=64, patch_size=16, max_images=4, max_patches_per_image=24, num_shards=1,
                         video=True, text_len=16)
  info = build_shards(str(manifest), str(tmp_path / "out"), options)
  assert info["video"] and info["num_examples"] == 2 and info["num_errors"] == 0
  (_, ex), = list(_read_shards(tmp_path / "out"))
  slots = {rid: (slot, mask) for slot, rid, mask in _slots(ex)}
  slot, mask = slots["clip"]
  rows, cols = ex["image_grid"][slot]
  assert (rows, cols) == (2, 3) and mask.sum() == 3 * rows * cols  # 3 frames of 2x3 patches in 24 tokens
  assert ex["patch_t"][mask].tolist() == [t for t in range(3) for _ in range(rows * cols)]
  for t in range(3):
    frame = image_ops.unpatchify(ex["patches"][mask][ex["patch_t"][mask] == t], rows, cols, 16)
    source = image_ops.decode_rgb((tmp_path / f"f{t}.png").read_bytes())
    np.testing.assert_array_equal(frame, image_ops.resize_to_grid(source, rows, cols, 16))
  np.testing.assert_allclose(np.frombuffer(ex["boxes"][slot], "<f4").reshape(-1, 4), boxes, rtol=1e-6)
  still_slot, still_mask = slots["still"]
  assert ex["patch_t"][still_mask].tolist() == [0] and ex["boxes"][still_slot] == b""
  text = ex["text_tokens"][ex["text_segment_ids"] == slot + 1]
  assert bytes((text - 1).astype(np.uint8).tolist()).decode() == "a clip"


def test_a_video_with_more_frames_than_the_patch_budget_is_an_error(tmp_path):
  manifest, _ = _video_manifest(tmp_path)
  info = build_shards(str(manifest), str(tmp_path / "out"), ShardOptions(seq_len=64, max_patches_per_image=2,
                                                                         video=True, max_error_fraction=1))
  errors = [json.loads(l) for l in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
  assert [(e["id"], e["reason"]) for e in errors] == [("clip", "too_many_frames")]
  assert info["num_examples"] == 1


def _mp4(frames):
  import av
  buffer = io.BytesIO()
  with av.open(buffer, mode="w", format="mp4") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
    for pixels in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    container.mux(stream.encode())
  return buffer.getvalue()


def test_video_files_are_decoded_sampled_and_packed_like_frame_lists(tmp_path):
  from beam_jobs import video
  frames = []
  for t in range(6):  # frame t: gray level 40 t, a bright square moving right by 8 px a frame
    pixels = np.full((64, 64, 3), 40 * t, np.uint8)
    pixels[16:32, 8 * t:8 * t + 16] = 250
    frames.append(pixels)
  data = _mp4(frames)
  (tmp_path / "clip.mp4").write_bytes(data)
  (tmp_path / "junk.mp4").write_bytes(b"not a video" * 50)
  (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
  boxes = [[0.25, 0.125 * t, 0.5, 0.125 * t + 0.25] for t in (1, 3, 5)]  # one per sampled frame
  rows = [{"id": "clip", "video": "clip.mp4", "label": 1, "boxes": boxes},
          {"id": "junk", "video": "junk.mp4", "label": 0},
          {"id": "cut", "video": "cut.mp4", "label": 0}]
  (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  options = ShardOptions(seq_len=64, patch_size=16, max_images=2, max_patches_per_image=48, num_shards=1,
                         video=True, video_frames=3, max_error_fraction=1)
  info = build_shards(str(tmp_path / "manifest.jsonl"), str(tmp_path / "out"), options)
  errors = [json.loads(l) for l in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
  assert [(e["line"], e["id"], e["reason"]) for e in errors] == [(2, "junk", "undecodable_video"),
                                                                 (3, "cut", "undecodable_video")]
  assert info["num_examples"] == 1 and info["options"]["video_frames"] == 3
  (_, ex), = list(_read_shards(tmp_path / "out"))
  (slot, rid, mask), = list(_slots(ex))
  assert rid == "clip" and tuple(ex["image_grid"][slot]) == (4, 4) and mask.sum() == 3 * 16
  assert ex["patch_t"][mask].tolist() == [t for t in range(3) for _ in range(16)]
  assert video.sample_indices(6, 3) == [1, 3, 5]
  expected = video.decode_sampled(data, 6, 3)
  for t, source in enumerate((1, 3, 5)):
    frame = image_ops.unpatchify(ex["patches"][mask][ex["patch_t"][mask] == t], 4, 4, 16)
    np.testing.assert_array_equal(frame, expected[t])  # the same pixels as decoding the file directly
    assert abs(float(frame[40:, :].mean()) - 40 * source) < 6  # and the frame that was sampled (lossy codec)
    assert frame[20:28, 8 * source + 4:8 * source + 12].mean() > 200  # its square where it was drawn
  np.testing.assert_allclose(np.frombuffer(ex["boxes"][slot], "<f4").reshape(-1, 4), boxes, rtol=1e-6)
  # Without --video a video file is refused, as a frame list is.
  info = build_shards(str(tmp_path / "manifest.jsonl"), str(tmp_path / "out2"),
                      ShardOptions(seq_len=64, max_patches_per_image=48, max_error_fraction=1))
  assert info["errors_by_reason"] == {"unsupported_video": 3}


def test_text_tokens_and_their_segment_ids(synthetic_dir, tmp_path):
  options = ShardOptions(seq_len=128, patch_size=16, max_images=8, max_patches_per_image=32, text_len=512)
  build_shards(str(synthetic_dir / "manifest.jsonl"), str(tmp_path), options)
  captions = {json.loads(l)["id"]: json.loads(l)["text"] for l in open(synthetic_dir / "manifest.jsonl")}
  checked = 0
  for _, ex in _read_shards(tmp_path):
    for slot, rid, _ in _slots(ex):
      tokens = ex["text_tokens"][ex["text_segment_ids"] == slot + 1]
      assert bytes((tokens - 1).astype(np.uint8).tolist()).decode() == captions[rid]
      checked += 1
    assert (ex["text_tokens"][ex["text_segment_ids"] == 0] == 0).all()
  assert checked == len(captions)


@pytest.mark.slow
def test_resolution_sampling_and_token_dropping_are_deterministic_and_recorded(synthetic_dir, tmp_path):
  options = ShardOptions(seq_len=128, patch_size=16, max_images=8, max_patches_per_image=32, seed=7,
                         resolution_sampling="uniform:4:32", token_drop="fixed:0.5")
  manifest = str(synthetic_dir / "manifest.jsonl")
  info = build_shards(manifest, str(tmp_path / "a"), options)
  build_shards(manifest, str(tmp_path / "b"), options, workers=2, beam_args=["--direct_running_mode=multi_processing"])
  _same_shards(tmp_path / "a", tmp_path / "b")  # two worker processes
  sources = {json.loads(l)["id"]: json.loads(l)["image"] for l in open(synthetic_dir / "manifest.jsonl")}
  dropped = 0
  for _, ex in _read_shards(tmp_path / "a"):
    for slot, rid, mask in _slots(ex):
      rows, cols = ex["image_grid"][slot]
      budget = options.sampling.budget(7, rid, 32)
      assert rows * cols <= budget and (rows + 1) * (cols + 1) > budget  # resized to use its drawn budget
      kept = options.dropping.kept_indices(7, rid, int(rows * cols), 32)
      assert mask.sum() == len(kept) == max(1, round(rows * cols * 0.5))
      source = image_ops.decode_rgb((synthetic_dir / sources[rid]).read_bytes())
      patches, yx = image_ops.patchify(image_ops.resize_to_grid(source, rows, cols, 16), 16)
      np.testing.assert_array_equal(ex["patches"][mask], patches[kept])
      np.testing.assert_array_equal(ex["patch_yx"][mask], yx[kept])
      dropped += rows * cols - len(kept)
  assert info["tokens_dropped"] == dropped > 0
  assert info["options"]["token_drop"] == "fixed:0.5" and info["options"]["resolution_sampling"] == "uniform:4:32"


def test_the_runner_is_the_in_process_one_unless_beam_args_name_another():
  runner, options = pipeline_runner([], 2)
  assert type(runner).__name__ == "FnApiRunner"
  assert options.get_all_options()["direct_num_workers"] == 2
  assert options.get_all_options()["direct_running_mode"] == "multi_threading"
  runner, options = pipeline_runner(["--runner", "DataflowRunner", "--project", "p"], 4)
  assert runner is None and options.get_all_options()["project"] == "p"
  runner, options = pipeline_runner(["--direct_running_mode=multi_processing"], 2)
  assert options.get_all_options()["direct_running_mode"] == "multi_processing"


def test_inputs_and_outputs_go_through_beam_filesystems_only(synthetic_dir, shard_dir):
  """The whole job on `memfs://` (a GCS-like in-memory FileSystem): manifest, classes.json, images, shards,
  dataset_info.json, errors.jsonl and lineage.json are all read and written through FileSystems."""
  from tests.test_beam_jobs import memfs
  for path in synthetic_dir.rglob("*"):
    if path.is_file():
      memfs.OBJECTS[f"memfs://bucket/data/{path.relative_to(synthetic_dir)}"] = path.read_bytes()
  info = build_shards("memfs://bucket/data/manifest.jsonl", "memfs://bucket/shards", OPTIONS)
  local = read_dataset_info(str(shard_dir))
  assert [(s["path"], s["sha256"]) for s in info["shards"]] == [(s["path"], s["sha256"]) for s in local["shards"]]
  for s in info["shards"]:
    assert memfs.OBJECTS[f"memfs://bucket/shards/{s['path']}"] == (shard_dir / s["path"]).read_bytes()
  assert info["class_names"] == local["class_names"]
  assert json.loads(memfs.OBJECTS["memfs://bucket/shards/lineage.json"])["inputs"]["manifest"]["fingerprint"]
  assert "memfs://bucket/shards/errors.jsonl" in memfs.OBJECTS
  assert not [p for p in memfs.OBJECTS if ".tmp-" in p]


def test_without_classes_json_the_class_count_is_the_largest_label_over_all_windows_plus_one(tmp_path, synthetic_dir):
  records = [json.loads(l) for l in (synthetic_dir / "manifest.jsonl").read_text().splitlines()[:12]]
  for i, rec in enumerate(records):
    rec["image"] = str(synthetic_dir / rec["image"])
    rec["label"] = 11 if i == 7 else i % 3  # one large label, in one of several windows
  manifest = tmp_path / "manifest.jsonl"
  manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
  options = ShardOptions(seq_len=128, max_patches_per_image=32, window_size=3)
  info = build_shards(str(manifest), str(tmp_path / "out"), options)
  assert info["num_classes"] == 12 and info["class_names"] == []
  records[7]["label"] = 2
  manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
  assert build_shards(str(manifest), str(tmp_path / "out2"), options)["num_classes"] == 3
