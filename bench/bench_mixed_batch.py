"""Mixed-adapter batches: eight requests with eight different adapters, submitted together.

Three ways to serve eight same-shape requests, each measured in the same run, alternating, over
several rounds (the median round counts):
(a) mixed: the eight requests, each with its own adapter, as one batch (one pipeline call);
(b) one at a time: the same eight requests, one pipeline call each;
(c) shared: eight requests on one shared adapter as one batch (today's uniform batch).
Targets: (a) at least 0.9x (c) (mixing costs under 10%) and faster than (b). Every adapter is
resident first (a warm worker's steady state).

    python bench/bench_mixed_batch.py [--preset sd15 --size 64 --steps 2]
    python bench/bench_mixed_batch.py --preset sd15 --device cuda --dtype bf16 --size 512 --steps 20
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from _lora_fixtures import parse_args, prepare_model, print_table, sync, write_adapters

from workers.engine.inference import AdapterRef, GenerationRequest, InferenceEngine

REQUESTS = 8


def _images_per_s(run: Callable[[], object], device: str) -> float:
    sync(device)
    started = time.perf_counter()
    run()
    sync(device)
    return REQUESTS / (time.perf_counter() - started)


def main() -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--size", type=int, default=None, help="image side in px")
    extra.add_argument("--rounds", type=int, default=3)
    extra.add_argument("--max-rank", type=int, default=8, help="the engine's slot rank")
    own, rest = extra.parse_known_args()
    args = parse_args(__doc__ or "", rest)
    steps = args.steps or (4 if args.preset == "tiny" else 2)
    size = own.size or (None if args.preset == "tiny" else 64)
    pipeline_dir = prepare_model(args.preset, args.workdir)
    paths = write_adapters(pipeline_dir, args.workdir, REQUESTS)
    engine = InferenceEngine(
        pipeline_dir=pipeline_dir,
        device=args.device,
        dtype=args.torch_dtype,
        max_active=REQUESTS,
        max_rank=own.max_rank,
    )
    refs = [AdapterRef(f"a{i}", path, 0.8) for i, path in enumerate(paths)]
    for ref in refs:
        engine.cache.activate(ref.key, ref.source)

    def request(ref: AdapterRef, seed: int) -> GenerationRequest:
        return GenerationRequest(
            prompt=f"a watercolor fox {seed}",
            adapters=[ref],
            num_inference_steps=steps,
            seed=seed,
            width=size,
            height=size,
        )

    mixed = [request(refs[i], i) for i in range(REQUESTS)]
    shared = [request(refs[0], i) for i in range(REQUESTS)]
    workloads: dict[str, Callable[[], object]] = {
        "(a) mixed, one batch": lambda: engine.generate_batch(mixed),
        "(b) one at a time": lambda: [engine.generate(r) for r in mixed],
        "(c) one shared adapter, one batch": lambda: engine.generate_batch(shared),
    }
    for run in workloads.values():  # warm-up
        run()
    rounds: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(own.rounds):
        for name, run in workloads.items():
            rounds[name].append(_images_per_s(run, args.device))
    ips = {name: statistics.median(values) for name, values in rounds.items()}
    a, b, c = ips.values()

    side = size or engine.default_size
    print(
        f"mixed batches, {args.preset} on {args.device} ({args.dtype}), {REQUESTS} requests, "
        f"{side} px, {steps} steps, slot rank {own.max_rank}, median of {own.rounds} rounds"
    )
    print_table(
        ["workload", "images/s", "vs (c)"],
        [[name, value, value / c] for name, value in ips.items()],
    )
    print(f"(a)/(c) = {a / c:.3f} (target >= 0.9) -> {'ok' if a / c >= 0.9 else 'MISSED'}")
    print(f"(a)/(b) = {a / b:.3f} (target > 1) -> {'ok' if a > b else 'MISSED'}")


if __name__ == "__main__":
    main()
