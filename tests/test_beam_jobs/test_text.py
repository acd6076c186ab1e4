import json

import numpy as np
import pytest
import tensorflow as tf

from beam_jobs import text
from beam_jobs.build_shards import build_shards
from beam_jobs.options import ShardOptions
from runner.cli import main
from schemas.dataset_info import packed_spec, read_dataset_info
from schemas.errors import ContractError


@pytest.fixture(scope="module")
def spm_model(synthetic_dir, tmp_path_factory):
  """A tiny SentencePiece model trained here on the synthetic captions (no download)."""
  import sentencepiece
  captions = [json.loads(l)["text"] for l in open(synthetic_dir / "manifest.jsonl")]
  out = tmp_path_factory.mktemp("spm")
  (out / "captions.txt").write_text("\n".join(captions * 20))
  sentencepiece.SentencePieceTrainer.train(input=str(out / "captions.txt"), model_prefix=str(out / "m"),
                                           vocab_size=30, model_type="unigram", minloglevel=2)
  return str(out / "m.model")


def test_byte_tokens_are_the_default_and_keep_zero_for_padding():
  tokens = text.tokenize("ab")
  assert tokens.tolist() == [ord("a") + 1, ord("b") + 1]
  assert text.describe() == {"kind": "bytes", "vocab_size": 257, "id_offset": 1}


def test_shards_carry_sentencepiece_tokens_of_each_caption(synthetic_dir, spm_model, tmp_path):
  import sentencepiece
  processor = sentencepiece.SentencePieceProcessor(model_file=spm_model)
  out = tmp_path / "shards"
  build_shards(str(synthetic_dir / "manifest.jsonl"), str(out), ShardOptions(
      seq_len=128, max_patches_per_image=32, max_images=4, text_len=64, tokenizer=spm_model))
  info = read_dataset_info(str(out))
  assert info["tokenizer"]["kind"] == "sentencepiece" and info["tokenizer"]["vocab_size"] == 31
  captions = {json.loads(l)["id"]: json.loads(l)["text"] for l in open(synthetic_dir / "manifest.jsonl")}
  spec = packed_spec(info)
  checked = 0
  for record in tf.data.TFRecordDataset(str(out / info["shards"][0]["path"])).take(3):
    ex = {k: v.numpy() for k, v in spec.tf_parse(record).items()}
    for slot, rid in enumerate(ex["example_ids"]):
      if not rid:
        continue
      ids = ex["text_tokens"][ex["text_segment_ids"] == slot + 1] - 1
      if not len(ids):  # the sequence's text budget ran out before this image's caption
        continue
      expected = processor.encode(captions[rid.decode()])
      assert ids.tolist() == expected[:len(ids)]
      checked += 1
  assert checked >= 3


def test_a_bad_tokenizer_file_is_one_clear_error(synthetic_dir, tmp_path, capsys):
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ContractError, match="not a SentencePiece model file"):
    build_shards(str(synthetic_dir / "manifest.jsonl"), str(tmp_path / "out"),
                 ShardOptions(seq_len=128, max_patches_per_image=32, text_len=16, tokenizer=str(bad)))
  code = main(["shards", "build", "--manifest", str(synthetic_dir / "manifest.jsonl"), "--output",
               str(tmp_path / "out2"), "--seq-len", "128", "--max-patches-per-image", "32", "--text-len", "16",
               "--tokenizer", str(tmp_path / "missing.model")])
  assert code == 2 and "--tokenizer" in capsys.readouterr().err
