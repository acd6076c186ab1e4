"""Running a snippet in a child Python that sees N CPU devices (XLA's flag must be set before jax loads)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_cpu_devices(code: str, devices: int, marker: str = "OK") -> str:
  """Runs `code` with `devices` host devices; asserts it printed `marker`; returns its stdout."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0 and marker in result.stdout, result.stderr[-3000:]
  return result.stdout
