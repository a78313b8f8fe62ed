"""The web console in headless Chromium against a real `lorastack serve`: sign in, upload a
dataset, plan and train, watch the job live, download the adapter, generate in the playground.

The tests share one served stack and run in file order: later ones use what earlier ones made
(the dataset, the trained adapter). Every request any page makes must stay on the server.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import make_pairs_zip
from tests.console.conftest import Served

pytestmark = pytest.mark.timeout(300)

FIRST_SCREEN_BUDGET_BYTES = 300 * 1024
WIDE = {"width": 1280, "height": 900}
NARROW = {"width": 390, "height": 844}


class Console:
    """A browser context on the console that records every request it makes."""

    def __init__(self, browser: Any, served: Served, viewport: dict[str, int]) -> None:
        self.served = served
        self.context = browser.new_context(viewport=viewport, accept_downloads=True)
        self.requests: list[str] = []
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))
        # Stopped by the pages' Content-Security-Policy inside the browser: never sent.
        self.context.on(
            "requestfailed",
            lambda request: request.failure == "csp" and self.blocked.append(request.url),
        )
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.set_default_timeout(30_000)

    def sign_in(self, key: str) -> None:
        self.page.goto(f"{self.served.base}/console")
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()

    def foreign_requests(self) -> list[str]:
        own = urlsplit(self.served.base).netloc
        return [
            url
            for url in self.requests
            if urlsplit(url).scheme not in ("data", "blob")
            and urlsplit(url).netloc != own
            and url not in self.blocked
        ]

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def console(browser: Any, served: Served) -> Iterator[Console]:
    opened = Console(browser, served, WIDE)
    yield opened
    assert opened.foreign_requests() == []
    assert opened.errors == []
    opened.close()


def safetensors_keys(path: Path) -> list[str]:
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return [k for k in header if k != "__metadata__"]


def test_root_redirects_to_the_console(served: Served) -> None:
    response = httpx.get(f"{served.base}/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/console"
    page = httpx.get(f"{served.base}/console")
    assert page.status_code == 200 and "lorastack console" in page.text
    schema = httpx.get(f"{served.base}/openapi.json").json()
    assert not any(p.startswith(("/console", "/docs", "/redoc")) for p in schema["paths"])


def test_first_screen_is_small_and_fast(browser: Any, served: Served) -> None:
    screen = Console(browser, served, WIDE)
    try:
        sizes: dict[str, int] = {}
        screen.page.on(
            "requestfinished",
            lambda request: sizes.__setitem__(request.url, request.sizes()["responseBodySize"]),
        )
        started = time.monotonic()
        screen.page.goto(f"{served.base}/console", wait_until="load")
        screen.page.get_by_label("API key").wait_for()
        elapsed = time.monotonic() - started
        screen.page.wait_for_load_state("networkidle")
        total = sum(sizes.values())
        print(f"first screen: {total} bytes in {len(sizes)} requests, {elapsed:.3f} s")
        # Bytes are asserted; time is a benchmark (bench/bench_console.py), not a test.
        assert 0 < total < FIRST_SCREEN_BUDGET_BYTES, sizes
        assert screen.foreign_requests() == []
    finally:
        screen.close()


@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/docs", "[id$='-create_training_job']"),  # Swagger UI: operations-{tag}-{id}
        ("/redoc", "[data-section-id='operation/create_training_job']"),
    ],
)
def test_api_reference_renders_offline(
    browser: Any, served: Served, path: str, operation: str
) -> None:
    reference = Console(browser, served, WIDE)
    try:
        reference.page.goto(f"{served.base}{path}")
        # Both render the operations of /openapi.json with locally served scripts.
        reference.page.locator(operation).first.wait_for(state="attached")
        reference.page.wait_for_load_state("networkidle")
        assert reference.foreign_requests() == []
    finally:
        reference.close()


def test_a_wrong_key_stays_on_sign_in(browser: Any, served: Served) -> None:
    screen = Console(browser, served, WIDE)
    try:
        screen.sign_in("not-a-key")
        screen.page.get_by_text("That key was not accepted.").wait_for()
        assert screen.page.get_by_role("navigation").is_hidden()
        assert screen.page.evaluate("sessionStorage.length") == 0
    finally:
        screen.close()


def test_sign_in_and_upload_a_dataset(console: Console, screenshots: Path) -> None:
    page = console.page
    console.sign_in(console.served.key)
    page.get_by_role("heading", name="Datasets").wait_for()
    assert console.served.key not in page.url
    assert page.evaluate("sessionStorage.getItem('lorastack.apiKey')") == console.served.key

    # Drag and drop, as a user does: a drop event carrying the zip.
    zipped = base64.b64encode(make_pairs_zip(8)).decode()
    transfer = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "squares.zip", { type: "application/zip" }));
            return dt;
        }""",
        zipped,
    )
    page.dispatch_event("[data-testid=dropzone]", "drop", {"dataTransfer": transfer})
    assert page.get_by_label("Name").input_value() == "squares"
    page.get_by_role("button", name="Upload").click()

    page.get_by_role("heading", name="Dataset squares").wait_for()
    assert page.get_by_label("Upload progress").count() == 0  # left the upload page on success
    report = page.locator("section.report")
    report.get_by_text("No warnings.").wait_for()
    assert report.locator("caption", has_text="Counts").count() == 1
    assert "Shorter side" in report.locator("figure.histogram").first.inner_text()
    page.wait_for_function(
        "[...document.querySelectorAll('ul.thumbs img')]"
        ".filter((img) => img.complete && img.naturalWidth > 0).length === 8"
    )
    page.screenshot(path=screenshots / "console-dataset.png", full_page=True)


def test_plan_and_train_then_watch_the_job(console: Console, screenshots: Path) -> None:
    page = console.page
    page.get_by_role("link", name="Train on this dataset").click()
    page.get_by_role("heading", name="Train a LoRA").wait_for()
    # Defaults and limits come from the API's schema.
    assert page.get_by_label("Rank").get_attribute("placeholder") == "16"
    assert page.get_by_label("Resolution").get_attribute("step") == "8"
    page.get_by_label("Adapter name").fill("squares")
    page.get_by_label("Preset").select_option("CPU smoke test (tiny model)")
    assert page.get_by_label("Max Steps").input_value() == "20"
    page.get_by_label("Validation Prompts").fill("a red square")
    page.get_by_label("Validation Every").fill("20")

    page.get_by_role("button", name="Plan (dry run)").click()
    plan = page.get_by_test_id("plan")
    plan.wait_for(timeout=180_000)  # the planner is a child process that imports torch
    assert "Trainable parameters" in plan.inner_text()
    assert "Estimated duration" in plan.inner_text()
    page.screenshot(path=screenshots / "console-train.png", full_page=True)

    page.get_by_role("button", name="Start training").click()
    page.get_by_role("heading", name="Job").wait_for()
    # Record every redraw of the loss chart: points must arrive one by one, live.
    page.evaluate(
        """() => {
            window.lossPoints = [];
            const svg = document.querySelector("[data-testid=loss-chart]");
            new MutationObserver(() => window.lossPoints.push(Number(svg.dataset.points)))
                .observe(svg, { attributes: true, attributeFilter: ["data-points"] });
        }"""
    )
    page.get_by_test_id("job-status").filter(has_text="succeeded").wait_for(timeout=240_000)
    seen = page.evaluate("window.lossPoints")
    assert max(seen) >= 2 and 1 in seen, seen
    assert int(page.get_by_test_id("lr-chart").get_attribute("data-points") or 0) >= 2
    assert "20 / 20" in page.get_by_test_id("job-step").inner_text()
    events = page.get_by_test_id("events").inner_text()
    assert "metrics" in events and "state" in events
    page.get_by_role("button", name="Promote step 10").wait_for()
    page.wait_for_function(
        "[...document.querySelectorAll('ul.gallery img')]"
        ".some((img) => img.complete && img.naturalWidth > 0)"
    )
    page.screenshot(path=screenshots / "console-job.png", full_page=True)


def test_an_evaluated_job_shows_its_grids(console: Console, screenshots: Path) -> None:
    """A training job with an evaluation: each evaluated step shows its same-seed grid and
    its figures on the job page (the loss chart gets no point from them)."""
    served = console.served
    headers = {"Authorization": f"Bearer {served.key}"}
    dataset = httpx.get(f"{served.base}/datasets", headers=headers).json()["data"][0]
    created = httpx.post(
        f"{served.base}/jobs",
        headers=headers,
        timeout=120,  # POST /jobs plans the run in a child process that imports torch
        json={
            "dataset_id": dataset["id"],
            "adapter_name": "squares-eval",
            "hyperparameters": {"resolution": 64, "rank": 4, "max_steps": 4, "checkpoint_every": 2},
            "evaluation": {"prompts": ["a red square"], "seeds": [0], "num_inference_steps": 2},
        },
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 240
    while httpx.get(f"{served.base}/jobs/{job_id}", headers=headers).json()["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, "the evaluated job did not end"
        time.sleep(0.5)
    page = console.page
    page.goto(f"{served.base}/console#/jobs/{job_id}")
    page.get_by_test_id("job-status").filter(has_text="succeeded").wait_for()
    page.get_by_text("evaluation, step 4").wait_for()
    assert "clip_score" in page.get_by_text("evaluation, step 2").inner_text()
    page.wait_for_function(
        "[...document.querySelectorAll('ul.gallery img')]"
        ".filter((img) => img.alt.startsWith('evaluation grid') && img.naturalWidth > 0)"
        ".length === 2"
    )
    assert int(page.get_by_test_id("loss-chart").get_attribute("data-points") or 0) >= 2


def test_checkpoint_metrics_best_version_and_a_grid(console: Console, screenshots: Path) -> None:
    """The evaluated job's metric table (base vs LoRA CLIP score, the best step), a checkpoint
    ref taken to the playground, an X/Y grid over it, and the adapter's best version."""
    served = console.served
    headers = {"Authorization": f"Bearer {served.key}"}
    jobs = httpx.get(f"{served.base}/jobs?kind=train", headers=headers).json()["data"]
    job = next(j for j in jobs if j["adapter_name"] == "squares-eval")
    best = job["result"]["evaluation"]["best_step"]
    page = console.page
    page.goto(f"{served.base}/console#/jobs/{job['id']}")
    table = page.get_by_test_id("evaluation-table")
    table.locator("tbody tr").nth(1).wait_for()
    headings = table.locator("th").all_inner_texts()
    assert "CLIP score (LoRA)" in headings and "CLIP score (base)" in headings
    rows = {r.split("\t")[0]: r for r in table.locator("tbody tr").all_inner_texts()}
    assert set(rows) == {"2", "4"} and "best" in rows[str(best)]
    assert "best" not in rows[str(6 - best)]
    page.get_by_role("row", name="squares-eval@ckpt:2").get_by_role(
        "link", name="Use in the playground"
    ).click()
    page.get_by_role("heading", name="Playground").wait_for()
    assert page.get_by_label("Weight of squares-eval@ckpt:2").count() == 1

    # The X/Y grid: the base model and the checkpoint, by two seeds.
    page.get_by_label("Steps", exact=True).fill("1")
    grid = page.get_by_test_id("grid-form")
    grid.get_by_label("X axis (columns)").select_option("adapter")
    assert grid.get_by_label("X values").input_value() == "none\nsquares-eval@ckpt:2"
    grid.get_by_label("Y axis (rows)").select_option("seed")
    grid.get_by_label("Y values").fill("1\n2")
    grid.get_by_role("button", name="Render grid").click()
    image = grid.get_by_test_id("grid-image")
    image.wait_for(timeout=120_000)
    assert image.get_attribute("alt") == "grid: base, squares-eval@ckpt:2 by seed 1, seed 2"
    page.wait_for_function("document.querySelector('[data-testid=grid-image]').naturalWidth > 0")
    grid.get_by_label("Y values").fill("1\nmany")
    grid.get_by_role("button", name="Render grid").click()
    grid.get_by_text("seed: many is not a whole number").wait_for()
    page.screenshot(path=screenshots / "console-grid.png", full_page=True)

    page.goto(f"{served.base}/console#/adapters/squares-eval")
    adapter = httpx.get(f"{served.base}/adapters/squares-eval", headers=headers).json()
    best_version = adapter["aliases"]["best"]
    assert page.get_by_test_id("best-version").inner_text().startswith(f"v{best_version}")
    version = page.get_by_role("article", name=f"Version {best_version}")
    assert version.locator(".tag.best").inner_text() == "best"
    assert "clip_score_base" in version.get_by_role("table", name="Metrics").inner_text()


def test_an_experiment_from_the_console(
    console: Console, screenshots: Path, tmp_path: Path
) -> None:
    page = console.page
    page.get_by_role("navigation").get_by_role("link", name="Experiments").click()
    form = page.get_by_test_id("experiment-form")
    form.wait_for()
    form.get_by_label("Adapter prefix").fill("sx")
    form.get_by_label("Values (comma-separated)").fill("2, 4")
    form.locator("summary").click()
    form.get_by_label("Max Steps").fill("2")
    form.get_by_label("Resolution").fill("64")
    evaluation = form.get_by_test_id("evaluation")
    # Defaults and limits of the evaluation come from the API's schema.
    assert evaluation.get_by_label("Num Inference Steps").get_attribute("placeholder") == "20"
    assert evaluation.get_by_label("Num Inference Steps").get_attribute("max") == "150"
    evaluation.get_by_label("Prompts", exact=True).fill("a red square")
    evaluation.get_by_label("Seeds").fill("0")
    evaluation.get_by_label("Num Inference Steps").fill("1")
    evaluation.get_by_label("Select: Mode").select_option("min")
    form.get_by_role("button", name="Start experiment").click()

    page.get_by_test_id("experiment-status").filter(has_text="succeeded").wait_for(timeout=240_000)
    assert "clip_score (min)" in page.locator("dl.facts").inner_text()  # the form's select
    runs = page.get_by_test_id("runs")
    runs.locator("tr.best-run").wait_for()
    assert runs.locator("tbody tr").count() == 2
    order = lambda: runs.locator("tbody tr").evaluate_all(  # noqa: E731
        "(rows) => rows.map((r) => r.dataset.run)"
    )
    assert order() == ["1", "2"]
    runs.get_by_role("button", name="Run").click()  # already ascending: now descending
    assert order() == ["2", "1"]
    runs.get_by_role("button", name="CLIP score (LoRA)").click()
    scores = runs.locator("tbody tr").evaluate_all("(rows) => rows.map((r) => r.dataset.run)")
    assert runs.locator("th[aria-sort=ascending]").inner_text().startswith("CLIP score (LoRA)")
    best_row = runs.locator("tr.best-run").get_attribute("data-run")
    assert scores[0] == best_row  # best by clip_score (min): first in ascending order
    for fmt in ("md", "csv"):
        with page.expect_download() as download_info:
            page.locator(f"button[data-format={fmt}]").click()
        target = tmp_path / f"report.{fmt}"
        download_info.value.save_as(target)
        text = target.read_text()
        assert "sx-1" in text and "sx-2" in text
    assert target.read_text().startswith("run,adapter,rank,")
    page.screenshot(path=screenshots / "console-experiment.png", full_page=True)
    page.get_by_role("navigation").get_by_role("link", name="Experiments").click()
    listed = page.get_by_test_id("experiments")
    listed.wait_for()
    assert "sx" in listed.inner_text() and f"run {best_row}" in listed.inner_text()


def test_find_the_adapter_and_download_both_formats(
    console: Console, screenshots: Path, tmp_path: Path
) -> None:
    page = console.page
    page.get_by_role("navigation").get_by_role("link", name="Adapters").click()
    page.get_by_label("Search adapters").fill("squ")
    page.get_by_role("link", name="squares", exact=True).click()
    page.get_by_role("heading", name="Adapter squares").wait_for()
    version = page.get_by_role("article", name="Version 1")
    saved = {}
    for fmt in ("diffusers", "kohya"):
        with page.expect_download() as download_info:
            version.locator(f"button[data-format={fmt}]").click()
        target = tmp_path / f"{fmt}.safetensors"
        download_info.value.save_as(target)
        saved[fmt] = safetensors_keys(target)
    assert saved["diffusers"] and all(not k.startswith("lora_unet_") for k in saved["diffusers"])
    assert saved["kohya"] and all(k.startswith("lora_unet_") for k in saved["kohya"])

    # Point an alias, then import the kohya file back as another adapter and read its lint.
    page.get_by_label("Alias", exact=True).fill("prod")
    page.get_by_role("button", name="Point alias").click()
    page.get_by_role("button", name="Remove prod").wait_for()
    page.screenshot(path=screenshots / "console-adapter.png", full_page=True)
    page.get_by_role("navigation").get_by_role("link", name="Adapters").click()
    importer = page.get_by_role("form", name="Import a LoRA file")
    importer.get_by_label("File (.safetensors)").set_input_files(tmp_path / "kohya.safetensors")
    importer.get_by_label("Adapter name").fill("squares-imported")
    importer.get_by_role("button", name="Import").click()
    importer.get_by_text("Imported as squares-imported@1.").wait_for()
    lint = importer.get_by_role("region", name="Lint report")
    assert "kohya" in lint.inner_text()


def test_generate_in_the_playground(console: Console, screenshots: Path) -> None:
    page = console.page
    page.goto(f"{console.served.base}/console#/adapters/squares")
    page.get_by_role("article", name="Version 1").get_by_role(
        "link", name="Use in the playground"
    ).click()
    page.get_by_role("heading", name="Playground").wait_for()
    assert page.get_by_label("Weight of squares@1").count() == 1
    page.get_by_label("Steps").fill("2")
    page.get_by_label("Seed", exact=True).fill("7")
    page.get_by_label("lock seed").check()
    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text("Generation done.").wait_for(timeout=120_000)
    page.get_by_role("button", name="Compare: base vs these adapters").click()
    page.get_by_text("Comparison done.").wait_for(timeout=120_000)
    images = page.get_by_test_id("generated")
    assert images.count() == 3
    page.wait_for_function(
        "[...document.querySelectorAll('[data-testid=generated]')]"
        ".every((img) => img.complete && img.naturalWidth > 0)"
    )
    compare = page.locator("li.compare figcaption").all_inner_texts()
    assert "base model" in compare[0] and "squares@1" in compare[1]
    assert all("seed 7" in caption for caption in compare)
    page.screenshot(path=screenshots / "console-playground.png", full_page=True)


def test_workers_page_and_narrow_layout(console: Console, screenshots: Path) -> None:
    page = console.page
    page.get_by_role("navigation").get_by_role("link", name="Workers").click()
    page.get_by_role("table", name="Live workers").wait_for()
    page.screenshot(path=screenshots / "console-workers.png", full_page=True)
    page.set_viewport_size(NARROW)
    for hash_ in ("#/datasets", "#/train", "#/playground", "#/jobs", "#/experiments"):
        page.goto(f"{console.served.base}/console{hash_}")
        page.locator("main h1").first.wait_for()
        page.wait_for_load_state("networkidle")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{hash_} scrolls sideways by {overflow}px at 390px"
    page.screenshot(path=screenshots / "console-jobs-narrow.png", full_page=True)
    page.set_viewport_size(WIDE)


def test_a_rejected_key_returns_to_sign_in(console: Console) -> None:
    page = console.page
    page.evaluate("sessionStorage.setItem('lorastack.apiKey', 'revoked-key')")
    page.goto(f"{console.served.base}/console#/adapters")
    page.get_by_text("The server did not accept the key (401)").wait_for()
    page.get_by_label("API key").wait_for()
    assert page.evaluate("sessionStorage.getItem('lorastack.apiKey')") is None
