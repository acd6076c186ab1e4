import numpy as np
import pytest
from PIL import Image

from beam_jobs import plan, write
from beam_jobs.options import ShardOptions
from beam_jobs.plan import Planned
from beam_jobs.sources import SourceExample
from beam_jobs.write import assemble_sequence, encode_sequence, read_ahead, sequence_fields, sequence_pieces
from schemas.manifest import ManifestRecord
from schemas.packed import PackedSpec

OPTIONS = ShardOptions(seq_len=128, patch_size=16, max_images=8, max_patches_per_image=32, num_shards=2)


def test_remote_reads_run_ahead_in_order_and_keep_their_errors():
  from tests.test_beam_jobs import memfs
  planned = []
  for i in range(100):
    record = ManifestRecord(id=f"r{i}", label=0, image=f"r{i}.png", line=i + 1)
    planned.append(Planned(SourceExample(record, (f"memfs://ahead/r{i}.png",)), 1, 1, 1, 1))
    if i % 7:
      memfs.OBJECTS[f"memfs://ahead/r{i}.png"] = f"bytes {i}".encode()
  results = list(read_ahead(planned, 1 << 20, threads=4))
  assert [r[0] for r in results if r[0]] == [[f"bytes {i}".encode()] for i in range(100) if i % 7]
  assert [(i, r[1].reason) for i, r in enumerate(results) if r[1]] == [(i, "missing_file") for i in range(0, 100, 7)]


def test_a_worker_out_of_memory_fails_the_bundle_instead_of_quarantining_the_image(tmp_path, monkeypatch):
  """A decode error is the file's fault and becomes an error row; running out of memory is the worker's, so it
  must reach Beam (which retries the bundle elsewhere) rather than mark a good image as bad for ever."""
  path = tmp_path / "a.png"
  Image.new("RGB", (40, 24), (1, 2, 3)).save(path)
  options = ShardOptions(seq_len=64, patch_size=16, max_images=4)
  planned = plan.plan_example(SourceExample(ManifestRecord(id="a", label=0, image=str(path), line=1), (str(path),)),
                            options)
  assert write.render_example(planned, options)["grid"] == (2, 2)  # 40x24 rounds to 2x2 patches: a resize

  for raised, expected in ((MemoryError(), MemoryError), (OSError("broken data stream"), plan.ExampleError)):
    def decode_fails(*args, raised=raised, **kwargs):
      raise raised

    monkeypatch.setattr(write.image_ops, "decode_resized", decode_fails)
    with pytest.raises(expected):
      write.render_example(planned, options)


def test_the_disk_reserved_for_a_shard_covers_a_full_record():
  assert OPTIONS.record_bytes_bound() >= OPTIONS.seq_len * OPTIONS.spec.patch_dim


def test_patches_as_chunks_encode_like_one_array():
  spec = PackedSpec(16, 2, 4)
  examples = [{"id": f"e{i}", "label": i, "patches": np.full((n, 12), i + 1, np.uint8),
               "yx": np.zeros((n, 2), np.int32), "t": np.zeros(n, np.int32), "grid": (1, n), "text_tokens": None,
               "boxes": np.zeros((0, 4), np.float32)} for i, n in enumerate([5, 3, 6])]
  fields, chunks, _ = sequence_fields(examples, spec)
  full, _ = assemble_sequence(examples, spec)
  assert encode_sequence(fields, chunks, spec) == spec.to_tf_example_bytes(full)
  pieces, size = sequence_pieces(fields, chunks, spec)
  assert size == sum(len(p) for p in pieces) == len(spec.to_tf_example_bytes(full))
  assert (full["patches"][14:] == 0).all() and (full["patches"][8:14] == 3).all()
