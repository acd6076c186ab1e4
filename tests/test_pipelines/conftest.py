import os
import socket

import pytest


@pytest.fixture
def gcs_emulator(monkeypatch):
  """A local GCS emulator (gcp-storage-emulator) with bucket `patchflow-test`; clients reach it through
  STORAGE_EMULATOR_HOST, their documented endpoint setting."""
  from gcp_storage_emulator.server import create_server
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket="patchflow-test")
  server.start()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  yield f"http://127.0.0.1:{port}"
  server.stop()
