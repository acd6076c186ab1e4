"""Test helper for gs:// paths on the GCS emulator (the `gcs_emulator` fixture of conftest.py)."""

import os


def upload_to_gcs(client, local_dir, prefix: str) -> str:
  """Copies a local directory to gs://patchflow-test/<prefix> through `client`; returns that URI."""
  bucket = client.bucket("patchflow-test")
  for folder, _, names in os.walk(local_dir):
    for name in names:
      path = os.path.join(folder, name)
      bucket.blob(f"{prefix}/{os.path.relpath(path, local_dir)}").upload_from_filename(path)
  return f"gs://patchflow-test/{prefix}"
