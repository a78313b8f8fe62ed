"""A real `lorastack serve` (embedded default, as tests/test_serve.py starts it) and a headless
system Chromium driven by Playwright, shared by the module's browser tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.test_serve import free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


@dataclass(frozen=True)
class Served:
    base: str
    key: str
    log_path: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("console-serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTACK_")}
    env.update(
        {"LORASTACK_DATA_DIR": str(root / "data"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    )
    log_path = root / "serve.log"
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
            timeout=180,
            what="serve to print its key",
            proc=proc,
        )
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=120, what="serve to be ready", proc=proc)
        yield Served(base=base, key=key, log_path=log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chromium_path() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("no system Chromium: apt-get install -y chromium (.ci/run does)")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium_path(),
            headless=True,
            # Root in a container: Chromium's sandbox needs user namespaces it may not have.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where page screenshots go: $LORASTACK_TEST_SCREENSHOTS, else a pytest temp folder."""
    named = os.environ.get("LORASTACK_TEST_SCREENSHOTS")
    folder = Path(named) if named else tmp_path_factory.mktemp("console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
