"""`patchflow shards build`: every flag reaches the job, bad values are one line and exit code 2."""

import json

import pytest

from runner.cli import main


def test_every_flag_reaches_the_job(synthetic_dir, tmp_path, capsys):
  out = tmp_path / "out"
  argv = ["shards", "build", "--manifest", str(synthetic_dir / "manifest.jsonl"), "--output", str(out),
          "--seq-len", "128", "--patch-size", "8", "--max-images", "6", "--max-patches-per-image", "64",
          "--num-shards", "3", "--workers", "1", "--seed", "5", "--resolution-sampling", "loguniform:4:64",
          "--token-drop", "beta:2:5", "--text-len", "32", "--window-size", "40", "--max-error-fraction", "0.2",
          "--video-frames", "5", "--max-file-bytes", "1000000", "--max-record-bytes", "300000",
          "--", "--direct_running_mode=in_memory"]
  assert main(argv) == 0
  assert capsys.readouterr().out.startswith("wrote ")
  info = json.loads((out / "dataset_info.json").read_text())
  assert info["options"] == {
      "seq_len": 128, "patch_size": 8, "max_images": 6, "max_patches_per_image": 64, "num_shards": 3, "seed": 5,
      "resolution_sampling": "loguniform:4:64", "token_drop": "beta:2:5", "text_len": 32, "window_size": 40,
      "max_error_fraction": 0.2, "video": False, "video_frames": 5, "tokenizer": "",
      "max_file_bytes": 1000000, "max_record_bytes": 300000}
  assert info["tokenizer"] == {"kind": "bytes", "vocab_size": 257, "id_offset": 1}
  assert info["tokens_dropped"] > 0 and info["splits"]["train"]["num_shards"] == 3
  lineage = json.loads((out / "lineage.json").read_text())
  assert lineage["config"]["workers"] == 1 and lineage["config"]["beam_args"] == ["--direct_running_mode=in_memory"]
  assert lineage["inputs"]["manifest"]["fingerprint"]


def test_the_synthetic_source_by_name(tmp_path, capsys):
  assert main(["shards", "build", "--manifest", "synthetic:train=6,val=0,test=0", "--output", str(tmp_path),
               "--seq-len", "256", "--max-patches-per-image", "64"]) == 0
  info = json.loads((tmp_path / "dataset_info.json").read_text())
  assert info["num_examples"] == 6 and info["class_names"][0] == "red" and info["source"].startswith("synthetic")


@pytest.mark.parametrize("flags, message", [
    (["--max-patches-per-image", "999"], "'max_patches_per_image' (999) must not exceed 'seq_len' (256)"),
    (["--token-drop", "half"], "--token-drop 'half': expected none, fixed:RATE"),
    (["--resolution-sampling", "uniform:9"], "--resolution-sampling 'uniform:9': expected 2 number(s)"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--num-shards", "0"], "'num_shards' must be an int >= 1, got 0"),
    (["--patch-size", "4096"], "a packed sequence would take up to 12884915200 bytes, over --max-record-bytes "
                               "67108864: --seq-len 256 tokens x 50331680 bytes a token (--patch-size 4096"),
    (["--max-file-bytes", "0"], "'max_file_bytes' must be an int >= 1, got 0"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
  manifest = tmp_path / "m.jsonl"
  manifest.write_text('{"id": "a", "image": "a.png", "label": 0}\n')
  assert main(["shards", "build", "--manifest", str(manifest), "--output", str(tmp_path / "o")] + flags) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("patchflow: error: ") and message in err
  assert not (tmp_path / "o").exists()  # refused before anything is written


def test_a_missing_manifest_is_one_line(tmp_path, capsys):
  assert main(["shards", "build", "--manifest", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path)]) == 2
  assert capsys.readouterr().err.strip() == f"patchflow: error: manifest {str(tmp_path / 'nope.jsonl')!r}: file not found"


def test_a_manifest_that_is_a_directory_is_one_line(tmp_path, capsys):
  assert main(["shards", "build", "--manifest", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err.strip() == f"patchflow: error: manifest {str(tmp_path)!r}: a directory, not a JSONL file"
  assert not (tmp_path / "out").exists()
