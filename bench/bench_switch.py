"""Adapter switch latency with 1, 10, 40, 100 adapters resident: slots vs diffusers.

Ours: ``InferenceEngine.switch_adapters`` with every adapter resident in the device tier; the
pool is told to forget its slot contents before each switch, so every switch copies a full
adapter into a slot (the worst case). Diffusers: ``load_lora_weights`` for every adapter into a
pipeline of the same model, then ``set_adapters([name], [weight])``. Both switch round-robin to
a different adapter each time; the table gives the median of the timed switches. All adapters
share rank 8 and their targets (alphas differ), so each switch does the same work at every
count and only the number of resident adapters changes.

    python bench/bench_switch.py [--preset sd15 --device cuda --dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _lora_fixtures import parse_args, prepare_model, print_table, sync, write_adapters
from diffusers import StableDiffusionPipeline

from workers.engine.inference import AdapterRef, InferenceEngine

COUNTS = (1, 10, 40, 100)
SWITCHES = 100


def time_ours(engine: InferenceEngine, paths: list[Path], count: int, device: str) -> float:
    refs = [AdapterRef(f"a{i}", paths[i], 0.8) for i in range(count)]
    for ref in refs:
        engine.cache.activate(ref.key, ref.source)
    samples = []
    for n in range(SWITCHES + 3):
        ref = refs[n % count]
        resident = engine.cache.activate(ref.key, ref.source)
        engine.slots.release(resident)  # force a full copy even when it already sits in a slot
        sync(device)
        started = time.perf_counter()
        engine.switch_adapters([ref])
        sync(device)
        if n >= 3:
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def time_diffusers(
    pipeline_dir: Path, paths: list[Path], count: int, args: argparse.Namespace
) -> tuple[float, float]:
    pipeline = StableDiffusionPipeline.from_pretrained(
        pipeline_dir, dtype=args.torch_dtype, safety_checker=None
    ).to(args.device)
    started = time.perf_counter()
    for i in range(count):
        pipeline.load_lora_weights(str(paths[i]), adapter_name=f"a{i}")
    load_s = (time.perf_counter() - started) / count
    samples = []
    for n in range(SWITCHES + 3):
        sync(args.device)
        started = time.perf_counter()
        pipeline.set_adapters([f"a{n % count}"], [0.8])
        sync(args.device)
        if n >= 3:
            samples.append(time.perf_counter() - started)
    return statistics.median(samples), load_s


def main() -> None:
    args = parse_args(__doc__ or "")
    pipeline_dir = prepare_model(args.preset, args.workdir)
    paths = write_adapters(pipeline_dir, args.workdir, max(COUNTS), uniform=True)
    engine = InferenceEngine(
        pipeline_dir=pipeline_dir,
        device=args.device,
        dtype=args.torch_dtype,
        max_active=4,
        max_rank=8,
        device_limit_count=max(COUNTS),
    )
    rows = []
    ours_at_1 = None
    for count in COUNTS:
        ours = time_ours(engine, paths, count, args.device)
        ours_at_1 = ours_at_1 or ours
        theirs, load_s = time_diffusers(pipeline_dir, paths, count, args)
        rows.append(
            [count, ours * 1e3, theirs * 1e3, theirs / ours, ours / ours_at_1, load_s * 1e3]
        )
    print(f"switch latency, {args.preset} on {args.device} ({args.dtype}), median of {SWITCHES}")
    print_table(
        [
            "resident",
            "ours ms",
            "diffusers ms",
            "diffusers/ours",
            "ours/ours@1",
            "diffusers load ms/adapter",
        ],
        rows,
    )
    at_40 = next(r for r in rows if r[0] == 40)
    at_100 = next(r for r in rows if r[0] == 100)
    flat, speedup = at_100[4], at_40[3]
    print(f"target ours@100 <= 1.2x ours@1: {flat:.2f}x -> {'ok' if flat <= 1.2 else 'MISSED'}")
    print(f"target >= 5x diffusers at 40: {speedup:.1f}x -> {'ok' if speedup >= 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
