"""API memory under large JSON bodies: peak RSS of `lorastack serve` while concurrent clients
post big JSON bodies to /generate, with the JSON body cap (default 1 MiB) and without it (the
cap raised to the upload cap, 512 MiB, which is what every body had before).

    python bench/bench_json_body_memory.py [--clients 3] [--mib 300]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from _service import free_port

UPLOAD_CAP = 512 * 1024 * 1024


def serve(
    data_dir: Path, *, max_json_bytes: int | None
) -> tuple[subprocess.Popen[bytes], int, str]:
    """`lorastack serve --no-worker` on the embedded default; returns (process, port, key)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTACK_")}
    # A base model that is never loaded: no request here gets as far as generating.
    env.update({"LORASTACK_DATA_DIR": str(data_dir), "LORASTACK_BASE_MODELS": '{"tiny": "/none"}'})
    if max_json_bytes is not None:
        env["LORASTACK_MAX_JSON_BYTES"] = str(max_json_bytes)
    port = free_port()
    log_path = data_dir / "serve.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorastack.cli", "serve", "--no-worker", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"^API key: (\S+)$", log_path.read_text(), re.M)
        if found:
            time.sleep(1.0)  # uvicorn binds after the key is printed
            return proc, port, found[1]
        if proc.poll() is not None:
            raise SystemExit(log_path.read_text()[-2000:])
        time.sleep(0.2)
    raise SystemExit("serve did not start")


def post_big_json(port: int, key: str, size: int, statuses: list[int]) -> None:
    """POST a JSON body of ``size`` bytes, sent in 1 MiB pieces."""
    prefix = b'{"prompt": "'
    suffix = b'"}'
    filler = size - len(prefix) - len(suffix)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.putrequest("POST", "/generate")
        conn.putheader("Authorization", f"Bearer {key}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        conn.send(prefix)
        piece = b"x" * (1024 * 1024)
        sent = 0
        while sent < filler:
            chunk = piece[: min(len(piece), filler - sent)]
            conn.send(chunk)
            sent += len(chunk)
        conn.send(suffix)
        statuses.append(conn.getresponse().status)
    except (ConnectionError, OSError):
        statuses.append(413)  # refused and closed before the body was sent
    finally:
        conn.close()


def measure(*, clients: int, size: int, max_json_bytes: int | None) -> tuple[float, float, list]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, key = serve(Path(tmp) / "data", max_json_bytes=max_json_bytes)
        try:
            api = psutil.Process(proc.pid)
            before = api.memory_info().rss
            statuses: list[int] = []
            threads = [
                threading.Thread(target=post_big_json, args=(port, key, size, statuses))
                for _ in range(clients)
            ]
            peak = before
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads):
                peak = max(peak, api.memory_info().rss)
                time.sleep(0.02)
            return before / 2**20, peak / 2**20, sorted(statuses)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--mib", type=int, default=300, help="size of each JSON body")
    args = parser.parse_args()
    size = args.mib * 2**20
    print(f"{args.clients} concurrent POST /generate with {args.mib} MiB JSON bodies")
    print("| JSON body cap | RSS before MiB | peak RSS MiB | statuses |")
    print("|---|---|---|---|")
    for label, cap in (("upload cap (512 MiB): before", UPLOAD_CAP), ("1 MiB (default)", None)):
        before, peak, statuses = measure(clients=args.clients, size=size, max_json_bytes=cap)
        print(f"| {label} | {before:.0f} | {peak:.0f} | {json.dumps(statuses)} |")


if __name__ == "__main__":
    main()
