"""The console's pure helpers (format, chart, SSE parser, schema-driven fields) under node's own
test runner; `.ci/run` installs nodejs when the machine lacks it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

UNIT_DIR = Path(__file__).parent / "unit"


def test_console_helpers_pass_node_tests() -> None:
    node = shutil.which("node")
    assert node, "the console unit tests need node (Debian: apt-get install -y nodejs)"
    files = sorted(str(p) for p in UNIT_DIR.glob("*.test.mjs"))
    assert len(files) >= 4, files
    result = subprocess.run(
        [node, "--test", *files], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout
