"""schemas/direct_io.py (its writers are tested through their users: tests/test_beam_jobs/test_shard_file.py,
tests/test_evaluators/test_rowstore.py)."""

import os

from schemas import direct_io


def test_preallocate_reserves_a_local_file(tmp_path):
  with open(tmp_path / "shard.tmp", "wb") as f:
    assert direct_io.preallocate(f.fileno(), 1 << 20)  # Linux, a local file system with fallocate
    assert os.fstat(f.fileno()).st_size == 1 << 20
    assert not direct_io.preallocate(f.fileno(), 0)
