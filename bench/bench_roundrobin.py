"""Generation throughput: requests round-robin over 50 distinct adapters vs all on one adapter.

Every adapter is made resident first (the steady state of a warm worker); then the same number
of requests runs twice, once cycling through the 50 adapters (a switch before each request)
and once on a single adapter. Target: round-robin throughput >= 0.9x the single-adapter one.

    python bench/bench_roundrobin.py [--preset sd15 --device cuda --dtype bf16]
"""

from __future__ import annotations

import time

from _lora_fixtures import parse_args, prepare_model, print_table, sync, write_adapters

from workers.engine.inference import AdapterRef, GenerationRequest, InferenceEngine

ADAPTERS = 50


def run(
    engine: InferenceEngine, requests: list[GenerationRequest], device: str
) -> tuple[float, float]:
    """(images per second, mean switch seconds) over ``requests``."""
    sync(device)
    started = time.perf_counter()
    switch_s = 0.0
    for request in requests:
        switch_s += engine.generate(request).timings.adapter_switch_s
    sync(device)
    elapsed = time.perf_counter() - started
    return len(requests) / elapsed, switch_s / len(requests)


def main() -> None:
    args = parse_args(__doc__ or "")
    steps = args.steps or (4 if args.preset == "tiny" else 20)
    pipeline_dir = prepare_model(args.preset, args.workdir)
    paths = write_adapters(pipeline_dir, args.workdir, ADAPTERS)
    engine = InferenceEngine(
        pipeline_dir=pipeline_dir,
        device=args.device,
        dtype=args.torch_dtype,
        max_active=4,
        max_rank=8,
        device_limit_count=ADAPTERS,
    )
    refs = [AdapterRef(f"a{i}", path, 0.8) for i, path in enumerate(paths)]
    for ref in refs:
        engine.cache.activate(ref.key, ref.source)

    def request(ref: AdapterRef, seed: int) -> GenerationRequest:
        return GenerationRequest(
            prompt="a watercolor fox", adapters=[ref], num_inference_steps=steps, seed=seed
        )

    total = 2 * ADAPTERS if args.preset == "tiny" else ADAPTERS
    round_robin = [request(refs[i % ADAPTERS], i) for i in range(total)]
    single = [request(refs[0], i) for i in range(total)]
    run(engine, single[:3], args.device)  # warm-up

    single_ips, single_switch = run(engine, single, args.device)
    rr_ips, rr_switch = run(engine, round_robin, args.device)
    print(
        f"throughput, {args.preset} on {args.device} ({args.dtype}), "
        f"{total} requests, {steps} steps"
    )
    print_table(
        ["workload", "images/s", "mean switch ms", "vs single"],
        [
            ["one adapter", single_ips, single_switch * 1e3, 1.0],
            [f"round-robin over {ADAPTERS}", rr_ips, rr_switch * 1e3, rr_ips / single_ips],
        ],
    )
    ratio = rr_ips / single_ips
    print(
        f"target round-robin >= 0.9x single: {ratio:.3f}x -> {'ok' if ratio >= 0.9 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
