"""DESIGN.md's layout table as a contract: import-linter's `lint-imports` over pyproject's [tool.importlinter]."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imports_follow_the_layout_table():
  lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
  result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert "BROKEN" not in result.stdout and "Contracts: 2 kept, 0 broken." in result.stdout
