"""The README's quickstarts (curl, then the CLI), run verbatim with bash against one real
`lorastack serve`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import wait_for
from tests.test_serve import free_port

REPO = Path(__file__).resolve().parents[1]


def quickstart_script(name: str = "quickstart") -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- {name}:begin -->\n```sh\n(.*?)```\n<!-- {name}:end -->", readme, re.S)
    assert block, f"README.md lost its {name} block"
    return block[1]


def test_readme_quickstart_runs_against_serve(tmp_path: Path) -> None:
    port = free_port()
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    # The script runs from a repo root: give it the venv and the example script it calls.
    (workdir / ".venv").symlink_to(Path(sys.prefix))
    (workdir / "examples").symlink_to(REPO / "examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTACK_")}
    env.update(
        {
            "LORASTACK_DATA_DIR": str(workdir / ".lorastack"),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "lorastack.cli", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=180, what="serve to be ready", proc=serve)

        def run(block: str) -> subprocess.CompletedProcess[str]:
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", quickstart_script(block)],
                cwd=workdir,
                env={**env, "URL": f"http://127.0.0.1:{port}", "XDG_CONFIG_HOME": str(tmp_path)},
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, (
                result.stdout + result.stderr + log_path.read_text()[-3000:]
            )
            return result

        result = run("quickstart")
        assert (workdir / "square.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for name in ("squares.safetensors", "squares-kohya.safetensors"):
            assert (workdir / name).stat().st_size > 1000
        assert "'version': 1" in result.stdout

        result = run("quickstart-cli")
        assert (workdir / "square-cli.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for name in ("squares-cli.safetensors", "squares-cli-kohya.safetensors"):
            assert (workdir / name).stat().st_size > 1000
        assert '"latest_version": 1' in result.stdout  # the last command's --json answer
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
