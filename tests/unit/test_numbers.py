"""The benchmark tables in README.md and docs/benchmarks.md are what benchmarks/results/
gives: ``scripts/render_numbers.py --check`` (no engine, no vLLM)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_numbers_tables_match_the_results_files():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_numbers.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
