"""The console's first screen: bytes and time to the sign-in form on loopback, in headless
Chromium (the system package), each load in a fresh browser context (no cache).

    .venv/bin/python bench/bench_console.py [--loads 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _service import percentile, serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("needs the system chromium package")
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve(Path(tmp) / "data") as served,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        url = f"http://127.0.0.1:{served.port}/console"
        times: list[float] = []
        totals: list[int] = []
        for _ in range(args.loads):
            context = browser.new_context()
            page = context.new_page()
            sizes: dict[str, int] = {}
            page.on(
                "requestfinished",
                lambda r, sizes=sizes: sizes.__setitem__(r.url, r.sizes()["responseBodySize"]),
            )
            started = time.perf_counter()
            page.goto(url)
            page.get_by_label("API key").wait_for()
            times.append(time.perf_counter() - started)
            page.wait_for_load_state("networkidle")
            totals.append(sum(sizes.values()))
            context.close()
        browser.close()
    print(f"first screen: {max(totals)} bytes in {len(sizes)} requests")
    print(
        f"time to the sign-in form over {args.loads} cold loads: "
        f"median {statistics.median(times) * 1000:.0f} ms, "
        f"p90 {percentile(times, 90) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
