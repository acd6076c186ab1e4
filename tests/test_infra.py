"""The image's install steps, run as the Dockerfile runs them, in a fresh directory (no Docker engine here)."""

import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dockerfile():
  with open(os.path.join(ROOT, "infra", "Dockerfile"), encoding="utf-8") as f:
    return f.read()


def test_dockerfile_copies_every_package_and_installs_from_the_lock():
  text = _dockerfile()
  copied = set(re.findall(r"^COPY (\S+) \S+$", text, flags=re.M))
  for package in ("schemas", "beam_jobs", "trainers", "evaluators", "components", "pipelines", "runner", "infra"):
    assert package in copied
  assert "uv sync --frozen --no-dev" in text and '--extra "$JAX_VARIANT"' in text


def test_locked_install_resolves_in_a_fresh_directory_for_every_variant(tmp_path):
  uv = shutil.which("uv") or os.path.join(ROOT, ".tools", "bin", "uv")
  for name in ("pyproject.toml", "uv.lock", "README.md"):
    shutil.copy(os.path.join(ROOT, name), tmp_path / name)
  for variant in ([], ["--extra", "cuda"], ["--extra", "tpu"]):
    # --dry-run resolves exactly what `uv sync --frozen` would install, without downloading accelerator wheels.
    result = subprocess.run([uv, "sync", "--frozen", "--no-dev", "--dry-run", "--no-install-project", *variant],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if variant == ["--extra", "cuda"]:
      assert "jax-cuda12" in result.stderr + result.stdout
    if variant == ["--extra", "tpu"]:
      assert "libtpu" in result.stderr + result.stdout
