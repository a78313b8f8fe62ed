"""Service overhead: p50/p99 latency of POST /generate through HTTP, SQL, Redis and a worker,
against calling the same pipeline (InferenceEngine.generate) in-process, in one run.

Requests to the service and in-process calls alternate, so both see the same machine
conditions. Starts `lorastack serve` on the embedded default (SQLite + its own Redis + one
worker) in a temporary data dir, then times sequential requests of the same shape both ways.

    python bench/bench_service_overhead.py [--requests 100] [--steps 2] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _service import percentile, serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    body = {
        "prompt": "a red square",
        "num_inference_steps": args.steps,
        "width": args.size,
        "height": args.size,
        "seed": 1,
    }
    payload = json.dumps(body).encode()
    inproc: list[float] = []
    service: list[float] = []
    worker_total: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="lorastack-bench-") as tmp,
        serve(Path(tmp) / "data") as served,
    ):
        # The same pipeline call in this process, on the same model folder, timed in turn
        # with the service so both see the same machine conditions.
        from workers.engine.inference import GenerationRequest, InferenceEngine

        engine = InferenceEngine(pipeline_dir=Path(tmp) / "data" / "models" / "tiny")
        request = GenerationRequest(
            prompt=body["prompt"],
            num_inference_steps=args.steps,
            width=args.size,
            height=args.size,
            seed=1,
        )
        for n in range(args.warmup + args.requests):
            elapsed, answer = served.generate(payload)
            started = time.perf_counter()
            engine.generate(request)
            local = time.perf_counter() - started
            if n >= args.warmup:
                service.append(elapsed)
                worker_total.append(answer["timings"]["total_s"])
                inproc.append(local)

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
