"""Process RSS after loading and evicting 100 adapters vs at start (target <= 5% growth).

Each adapter goes through every tier (fetch -> load -> activate -> switched into a slot) and is
then evicted from all of them. The adapters are rank 64 on every covered module, the heaviest
the engine takes, so a leak would show. RSS is read after a warm-up of 10 adapters (allocator pools,
lazy imports) and again after the other 100.

    python bench/bench_memory.py [--preset sd15 --device cuda --dtype bf16]
"""

from __future__ import annotations

import gc

from _lora_fixtures import parse_args, prepare_model, print_table, rss_bytes, write_adapters

from workers.engine.inference import AdapterRef, InferenceEngine, load_lora_file

COUNT = 100
WARM_UP = 10


def main() -> None:
    args = parse_args(__doc__ or "")
    pipeline_dir = prepare_model(args.preset, args.workdir)
    paths = write_adapters(pipeline_dir, args.workdir, COUNT + WARM_UP, large=True)
    engine = InferenceEngine(
        pipeline_dir=pipeline_dir,
        device=args.device,
        dtype=args.torch_dtype,
        max_active=4,
        max_rank=64,
        device_limit_count=8,
    )

    def cycle(indices: range) -> None:
        for i in indices:
            engine.switch_adapters([AdapterRef(f"a{i}", paths[i], 1.0)])
            engine.cache.evict(f"a{i}")

    cycle(range(WARM_UP))
    gc.collect()
    before = rss_bytes()
    cycle(range(WARM_UP, WARM_UP + COUNT))
    engine.switch_adapters([])
    gc.collect()
    after = rss_bytes()
    loaded = sum(load_lora_file(p).nbytes for p in paths[WARM_UP:])
    growth = after / before - 1
    print(
        f"RSS, {args.preset} on {args.device} ({args.dtype}), {COUNT} adapters loaded and evicted"
    )
    print_table(
        ["RSS at start MiB", "RSS after MiB", "growth %", "adapter bytes loaded MiB"],
        [[before / 2**20, after / 2**20, growth * 100, loaded / 2**20]],
    )
    print(f"target growth <= 5%: {growth * 100:.2f}% -> {'ok' if growth <= 0.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
