"""Service overhead of several versions side by side, under the same machine conditions.

Each git revision given (and "." for the working tree) is checked out in a temporary worktree
and served at once with `lorastack serve` on the embedded default; identical POST /generate
requests go to each in turn. For every request the figure is its latency minus its own
pipeline time in the worker (`timings.total_s`), as in bench_service_overhead.py. Comparing two
separate runs of that benchmark would mix in the machine's drift between them; this doesn't.

    python bench/compare_service_overhead.py BASE_REV [REV ...] [.] [--requests 80]

All versions run on this checkout's virtual environment, so they must share its dependencies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _service import percentile, serve

ROOT = Path(__file__).resolve().parents[1]


def checkout(stack: ExitStack, rev: str, into: Path) -> Path:
    """The source tree of ``rev``: this checkout for ".", else a detached worktree."""
    if rev == ".":
        return ROOT
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--quiet", "--detach", str(into), rev],
        check=True,
    )
    stack.callback(
        subprocess.run,
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(into)],
        check=False,
    )
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("revs", nargs="+", help='git revisions; "." is the working tree')
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()

    payload = json.dumps(
        {
            "prompt": "a red square",
            "num_inference_steps": args.steps,
            "width": args.size,
            "height": args.size,
            "seed": 1,
        }
    ).encode()
    added: list[list[float]] = [[] for _ in args.revs]
    with tempfile.TemporaryDirectory(prefix="lorastack-compare-") as tmp, ExitStack() as stack:
        services = [
            stack.enter_context(
                serve(
                    Path(tmp) / f"data-{i}",
                    source=checkout(stack, rev, Path(tmp) / f"src-{i}"),
                )
            )
            for i, rev in enumerate(args.revs)
        ]
        for n in range(args.warmup + args.requests):
            for served, samples in zip(services, added, strict=True):
                elapsed, answer = served.generate(payload)
                if n >= args.warmup:
                    samples.append(elapsed - answer["timings"]["total_s"])

    print(
        f"{args.requests} requests to each, interleaved; {args.steps} steps, {args.size}px, "
        "tiny model, CPU, embedded SQLite + Redis"
    )
    columns = "".join(f"{c:>9s}" for c in ("p25 ms", "p50 ms", "p75 ms", "p99 ms"))
    print(f"{'version':24s}{columns} {'p50 / first':>12s}")
    first = percentile(added[0], 50)
    for rev, samples in zip(args.revs, added, strict=True):
        p25, p50, p75, p99 = (percentile(samples, q) * 1e3 for q in (25, 50, 75, 99))
        print(f"{rev:24s}{p25:9.2f}{p50:9.2f}{p75:9.2f}{p99:9.2f} {p50 / 1e3 / first:11.2f}x")


if __name__ == "__main__":
    main()
