"""One real `lorastack serve` (API + worker + embedded Redis, SQLite) for a test module."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from tests.conftest import REPO, make_pairs_zip, wait_for
from tests.test_serve import free_port

# Tiny training for CPU tests: a few seconds per job.
TINY = {"max_steps": 10, "resolution": 32, "rank": 4, "learning_rate": 1e-3}


@dataclass(frozen=True)
class Served:
    url: str
    api_key: str
    data_dir: Path
    env: dict[str, str]


def serve(data_dir: Path, model_dir: Path) -> Iterator[Served]:
    """Start `lorastack serve` on a free port; stop it (SIGTERM) afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTACK_")}
    env.update(
        {
            "LORASTACK_DATA_DIR": str(data_dir),
            "LORASTACK_BASE_MODELS": json.dumps({"tiny": str(model_dir)}),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    log_path = data_dir.parent / f"{data_dir.name}-serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorastack.cli", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=180, what="serve to be ready", proc=proc)
        key = (data_dir / "api_key").read_text().strip().splitlines()[-1]
        yield Served(url=url, api_key=key, data_dir=data_dir, env=env)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as a user's Ctrl-C; if serve hangs, kill it and its children (its worker runs
    in a session of its own and would outlive it)."""
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.kill()
        proc.wait()


def dataset_folder(path: Path, count: int = 4) -> Path:
    """A folder of image + caption pairs (the pairs layout)."""
    path.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(make_pairs_zip(count, size=32))) as archive:
        archive.extractall(path)
    return path
