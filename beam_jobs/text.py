"""Caption / question tokens for the packed `text_tokens` field: byte-level by default, SentencePiece when a
model file is given. Ids are shifted by one in both cases so that 0 stays free for padding."""

import functools
import hashlib

import numpy as np

from beam_jobs.image_ops import byte_tokens
from schemas import storage
from schemas.errors import ContractError

BYTE_VOCAB_SIZE = 257  # 256 byte values + padding


@functools.lru_cache(maxsize=4)
def _sentencepiece(path: str):
  """One processor per model file and process (Beam workers call this once, then reuse it)."""
  import sentencepiece
  try:
    data = storage.read_bytes(path)
  except (OSError, ValueError) as e:
    raise ContractError(f"--tokenizer {path!r}: cannot read ({e})") from None
  processor = sentencepiece.SentencePieceProcessor()
  try:
    processor.LoadFromSerializedProto(data)
  except (RuntimeError, OSError):
    raise ContractError(f"--tokenizer {path!r}: not a SentencePiece model file") from None
  return processor, hashlib.sha256(data).hexdigest()


def tokenize(text: str, tokenizer: str = "") -> np.ndarray:
  if not tokenizer:
    return byte_tokens(text)
  processor, _ = _sentencepiece(tokenizer)
  return np.asarray(processor.EncodeAsIds(text), dtype=np.int32) + 1


def describe(tokenizer: str = "") -> dict:
  """What dataset_info.json records about the tokenizer, so readers can decode and check the tokens."""
  if not tokenizer:
    return {"kind": "bytes", "vocab_size": BYTE_VOCAB_SIZE, "id_offset": 1}
  processor, digest = _sentencepiece(tokenizer)
  return {"kind": "sentencepiece", "path": tokenizer, "sha256": digest,
          "vocab_size": processor.GetPieceSize() + 1, "id_offset": 1}
