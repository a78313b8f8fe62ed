"""`lorastack serve` on the embedded default: SQLite, its own Redis, one worker, clean stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_embedded_default_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTACK_")}
    env["LORASTACK_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONUNBUFFERED"] = "1"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorastack.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        key = wait_for(
            lambda: (m := re.search(r"^API key: (\S+)$", log_path.read_text(), re.M)) and m[1],
            timeout=120,
            what="serve to print its key",
            proc=proc,
        )
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", headers=headers).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=60, what="readyz", proc=proc)
        assert (tmp_path / "data" / "lorastack.db").exists()
        assert (tmp_path / "data" / "models" / "tiny" / "model_index.json").exists()
        pong = httpx.post(f"{base}/ping?wait=30", headers=headers, timeout=40).json()
        assert pong["status"] == "succeeded" and pong["result"]["pong"] is True
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert children, "serve should run a worker and a redis-server"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert "lorastack stopped" in log_path.read_text()
    time.sleep(0.5)
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"child {pid} still running"
    # A second serve on the same data dir reuses the key, the model and the database.
    assert key in (tmp_path / "data" / "api_key").read_text()


def _is_zombie(pid: str) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
