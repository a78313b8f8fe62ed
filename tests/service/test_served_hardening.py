"""A served stack (`lorastack serve` on PostgreSQL/SQLite + Redis): what the OpenAI SDK shows of
our errors, and what a `kill -9` during an upload leaves behind after a restart."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Stack, wait_for
from tests.test_serve import free_port

SCRATCH_KINDS = ("upload-", "ingest-")


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    base_url: str
    key: str
    data_dir: Path
    log: Path


def serve(stack: Stack, data_dir: Path, *, log_name: str = "serve.log") -> Served:
    """`lorastack serve --no-worker` on the stack's database and Redis, in its own data dir."""
    port = free_port()
    env = {**stack.env, "LORASTACK_DATA_DIR": str(data_dir)}
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / log_name
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorastack.cli", "serve", "--no-worker", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    key = wait_for(
        lambda: (m := re.search(r"^API key: (\S+)$", log.read_text(), re.M)) and m[1],
        timeout=120,
        what="serve to print its key",
        proc=proc,
    )
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base_url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout=60, what="serve to answer", proc=proc)
    return Served(proc=proc, base_url=base_url, key=key, data_dir=data_dir, log=log)


def stop(served: Served, *, sig: int = signal.SIGTERM) -> None:
    if served.proc.poll() is None:
        served.proc.send_signal(sig)
        served.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def served(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    running = serve(stack, tmp_path_factory.mktemp("served"))
    try:
        yield running
    finally:
        stop(running)


def test_the_openai_sdk_shows_our_error_messages(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=served.key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.images.generate(model="no-such-adapter", prompt="a cat")
    assert not_found.value.status_code == 404
    assert not_found.value.code == "model_not_found"
    assert "no-such-adapter" in not_found.value.message

    with pytest.raises(openai.UnprocessableEntityError) as bad_size:
        client.images.generate(prompt="a cat", size="0x8")  # type: ignore[arg-type]
    assert bad_size.value.param == "size"
    assert "multiples of 8" in bad_size.value.message
    assert bad_size.value.type == "invalid_request_error"

    stranger = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="lsk_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        stranger.images.generate(prompt="a cat")
    assert "invalid or revoked API key" in unauthorized.value.message
    assert unauthorized.value.code == "unauthorized"


def _many_images_zip(count: int) -> bytes:
    from tests.conftest import make_pairs_zip

    one = zipfile.ZipFile(io.BytesIO(make_pairs_zip(1)))
    png, caption = one.read("img_00.png"), one.read("img_00.txt")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            archive.writestr(f"img_{i:04d}.png", png)
            archive.writestr(f"img_{i:04d}.txt", caption)
    return buffer.getvalue()


def _scratch_entries(data_dir: Path) -> list[str]:
    scratch = data_dir / "artifacts" / ".tmp"
    if not scratch.is_dir():
        return []
    return sorted(p.name for p in scratch.iterdir() if p.name.startswith(SCRATCH_KINDS))


def test_kill_9_during_an_upload_leaves_nothing_after_a_restart(
    stack: Stack, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = serve(stack, data_dir)
    body = _many_images_zip(400)
    result: dict[str, object] = {}

    def upload() -> None:
        try:
            result["response"] = httpx.post(
                f"{first.base_url}/datasets",
                headers={"Authorization": f"Bearer {first.key}"},
                data={"name": "crash"},
                files={"file": ("many.zip", body, "application/zip")},
                timeout=120,
            )
        except httpx.TransportError as exc:
            result["error"] = exc

    import threading

    thread = threading.Thread(target=upload)
    try:
        thread.start()
        # The upload is spooled and ingested in the store's scratch folder: kill it there.
        staged = wait_for(
            lambda: [n for n in _scratch_entries(data_dir) if n.startswith("ingest-")],
            timeout=60,
            interval=0.005,
            what="the ingest to start",
            proc=first.proc,
        )
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
        thread.join(timeout=60)
    finally:
        stop(first, sig=signal.SIGKILL)
    assert "error" in result, "the upload should have been cut by the kill"
    left = _scratch_entries(data_dir)
    assert staged[0] in left and any(n.startswith("upload-") for n in left), left

    second = serve(stack, data_dir, log_name="serve-2.log")
    try:
        assert _scratch_entries(data_dir) == []
        datasets = data_dir / "artifacts" / "datasets"
        assert not datasets.exists() or not [p for p in datasets.iterdir() if p.is_dir()]
    finally:
        stop(second)
