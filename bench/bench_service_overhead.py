"""Service overhead: p50/p99 latency of POST /generate through HTTP, SQL, Redis and a worker,
against calling the same pipeline (InferenceEngine.generate) in-process, in one run.

Requests to the service and in-process calls alternate, so both see the same machine
conditions. Starts `lorastack serve` on the embedded default (SQLite + its own Redis + one
worker) in a
temporary data dir, then times sequential requests of the same shape both ways.

    python bench/bench_service_overhead.py [--requests 100] [--steps 2] [--size 32]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with tempfile.TemporaryDirectory(prefix="lorastack-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTACK_")}
        env.update({"LORASTACK_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"})
        port = free_port()
        log_path = Path(tmp) / "serve.log"
        with open(log_path, "wb") as log:
            serve = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "serve",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            key = None
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            with httpx.Client(timeout=60) as client:
                while time.monotonic() < deadline:
                    match = re.search(r"^API key: (\S+)$", log_path.read_text(), re.M)
                    if match:
                        key = match[1]
                        try:
                            if client.get(f"{base}/readyz").status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                    time.sleep(0.2)
                else:
                    raise SystemExit("serve did not become ready:\n" + log_path.read_text())
                # The same pipeline call in this process, on the same model folder, timed in
                # turn with the service so both see the same machine conditions.
                from workers.engine.inference import GenerationRequest, InferenceEngine

                engine = InferenceEngine(pipeline_dir=data_dir / "models" / "tiny")
                request = GenerationRequest(
                    prompt="a red square",
                    num_inference_steps=args.steps,
                    width=args.size,
                    height=args.size,
                    seed=1,
                )
                inproc: list[float] = []
                headers = {"Authorization": f"Bearer {key}"}
                body = {
                    "prompt": "a red square",
                    "num_inference_steps": args.steps,
                    "width": args.size,
                    "height": args.size,
                    "seed": 1,
                }
                service: list[float] = []
                worker_total: list[float] = []
                # The standard library's client on one keep-alive connection: it adds far less
                # of its own time than httpx, so the figure is the service's.
                conn = http.client.HTTPConnection("127.0.0.1", port)
                payload = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
                for n in range(args.warmup + args.requests):
                    started = time.perf_counter()
                    conn.request("POST", "/generate", body=payload, headers=headers)
                    response = conn.getresponse()
                    answer = response.read()
                    elapsed = time.perf_counter() - started
                    if response.status != 200:
                        raise SystemExit(f"POST /generate: {response.status} {answer!r}")
                    started = time.perf_counter()
                    engine.generate(request)
                    local = time.perf_counter() - started
                    if n >= args.warmup:
                        service.append(elapsed)
                        worker_total.append(json.loads(answer)["timings"]["total_s"])
                        inproc.append(local)
                conn.close()
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=60)

    rows = [
        ("in-process InferenceEngine.generate", inproc),
        ("worker's own generate time (timings.total_s)", worker_total),
        ("POST /generate via HTTP + SQL + Redis + worker", service),
    ]
    print(
        f"{args.requests} sequential requests, {args.steps} steps, {args.size}px, tiny model, "
        "CPU, embedded SQLite + Redis"
    )
    print(f"{'path':50s} {'p50 ms':>9s} {'p99 ms':>9s}")
    for name, samples in rows:
        print(
            f"{name:50s} {percentile(samples, 50) * 1e3:9.1f} {percentile(samples, 99) * 1e3:9.1f}"
        )
    added_p50 = (percentile(service, 50) - percentile(inproc, 50)) * 1e3
    added_p99 = (percentile(service, 99) - percentile(inproc, 99)) * 1e3
    print(f"{'added: p(service) - p(in-process)':50s} {added_p50:9.1f} {added_p99:9.1f}")
    # Per request: its latency minus the time its own pipeline call took in the worker. Pairing
    # takes the pipeline's run-to-run variation (several ms on a shared CPU) out of the figure.
    paired = [s - w for s, w in zip(service, worker_total, strict=True)]
    paired_p50 = percentile(paired, 50) * 1e3
    print(
        f"{'added per request: latency - its pipeline time':50s} {paired_p50:9.1f} "
        f"{percentile(paired, 99) * 1e3:9.1f}"
        f"   (target: <= 15 ms at p50: {'met' if paired_p50 <= 15 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
