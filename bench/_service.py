"""Shared by the service benchmarks: run `lorastack serve` on the embedded default and time
`POST /generate` through it."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A running `lorastack serve`: one keep-alive connection and its API key."""

    port: int
    key: str
    conn: http.client.HTTPConnection

    def generate(self, payload: bytes) -> tuple[float, dict[str, Any]]:
        """(seconds from request to full answer, the answer) of one POST /generate.

        The standard library's client on one keep-alive connection: it adds far less of its
        own time than httpx, so the figure is the service's.
        """
        started = time.perf_counter()
        self.conn.request(
            "POST",
            "/generate",
            body=payload,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        response = self.conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise SystemExit(f"POST /generate: {response.status} {body!r}")
        return elapsed, json.loads(body)


@contextmanager
def serve(
    data_dir: Path, *, source: Path | None = None, timeout_s: float = 180
) -> Iterator[Served]:
    """`lorastack serve` (SQLite, its own Redis, one worker) in ``data_dir``, from the checkout
    at ``source`` (default: this one), stopped with SIGTERM on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTACK_")}
    env.update({"LORASTACK_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"})
    if source is not None:
        env["PYTHONPATH"] = str(source)  # ahead of the editable install of this checkout
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "serve.log"
    port = free_port()
    command = ["-m", "lorastack.cli", "serve", "--port", str(port), "--log-level", "warning"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *command], env=env, cwd=source, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout_s
        key = None
        while key is None or not _ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve did not become ready:\n" + log_path.read_text())
            time.sleep(0.2)
            match = re.search(r"^API key: (\S+)$", log_path.read_text(), re.M)
            key = match[1] if match else None
        conn = http.client.HTTPConnection("127.0.0.1", port)
        try:
            yield Served(port=port, key=key, conn=conn)
        finally:
            conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        conn.close()
