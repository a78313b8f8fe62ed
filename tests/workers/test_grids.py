"""POST /grids with a real worker on the tiny model: one labeled PNG whose cells are the
stored cell images and render what /generate renders for the same settings."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import Stack, wait_for
from tests.service.test_app import assert_problem
from tests.workers.test_generation import lora_files, publish  # noqa: F401 (fixture)

COMMON = {"prompt": "a red square", "num_inference_steps": 2, "width": 64, "height": 64}


def pixels(client: TestClient, auth: dict[str, str], image_id: str) -> np.ndarray:
    response = client.get(f"/images/{image_id}", headers=auth)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def check_cells(client: TestClient, auth: dict[str, str], grid: dict[str, Any]) -> np.ndarray:
    """The grid image holds each cell's stored image at its place, with ink in every label."""
    image = pixels(client, auth, grid["image_id"])
    layout = grid["layout"]
    rows, columns = len(grid["rows"]), len(grid["columns"])
    assert (layout["rows"], layout["columns"]) == (rows, columns)
    assert len(grid["cells"]) == rows and all(len(row) == columns for row in grid["cells"])
    assert image.shape[:2] == (
        layout["origin_y"] + rows * layout["cell_height"],
        layout["origin_x"] + columns * layout["cell_width"],
    )
    for r, row in enumerate(grid["cells"]):
        for c, cell in enumerate(row):
            left = layout["origin_x"] + c * layout["cell_width"]
            top = layout["origin_y"] + r * layout["cell_height"]
            box = image[top : top + layout["cell_height"], left : left + layout["cell_width"]]
            assert np.array_equal(box, pixels(client, auth, cell["image_id"]))
            if r == 0:
                assert (image[: layout["origin_y"], left : left + layout["cell_width"]] < 128).any()
        if grid["rows"][r]:
            band = image[top : top + layout["cell_height"], : layout["origin_x"]]
            assert (band < 128).any()
    return image


def test_grid_of_adapters_by_seeds(
    client: TestClient,
    auth: dict[str, str],
    stack: Stack,
    worker: subprocess.Popen[bytes],
    lora_files: list[Path],  # noqa: F811
) -> None:
    publish(stack, auth, "grid-a", lora_files[0])
    body = {
        **COMMON,
        "x": {"axis": "adapter", "values": [None, "grid-a"]},
        "y": {"axis": "seed", "values": [5, 6]},
        "wait": 120,
    }
    response = client.post("/grids", headers=auth, json=body)
    assert response.status_code == 200, response.text
    grid = response.json()
    assert grid["columns"] == ["base", "grid-a"] and grid["rows"] == ["seed 5", "seed 6"]
    assert grid["url"].endswith(f"/images/{grid['image_id']}")
    check_cells(client, auth, grid)
    # A cell renders what /generate renders with the same adapter, seed and settings (within
    # a unit: the grid's batch of two images rounds differently from a single image).
    generated = client.post(
        "/generate",
        headers=auth,
        json={**COMMON, "seed": 6, "adapters": [{"ref": "grid-a"}]},
    ).json()
    cell = pixels(client, auth, grid["cells"][1][1]["image_id"]).astype(int)
    assert np.abs(cell - pixels(client, auth, generated["images"][0]["id"])).max() <= 2
    assert not np.array_equal(
        pixels(client, auth, grid["cells"][1][0]["image_id"]),
        pixels(client, auth, grid["cells"][1][1]["image_id"]),
    )


def test_grid_job_of_weights_by_prompts_polled(
    client: TestClient,
    auth: dict[str, str],
    stack: Stack,
    worker: subprocess.Popen[bytes],
    lora_files: list[Path],  # noqa: F811
) -> None:
    publish(stack, auth, "grid-w", lora_files[1])
    body = {
        "num_inference_steps": 2,
        "seed": 3,
        "adapter": "grid-w",
        "x": {"axis": "weight", "values": [0, 0.5, 1]},
        "y": {"axis": "prompt", "values": ["a red square", "a blue circle"]},
    }
    response = client.post("/grids", headers=auth, json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "grid" and response.headers["location"] == f"/jobs/{job['id']}"

    def done() -> dict[str, Any] | None:
        row: dict[str, Any] = client.get(f"/jobs/{job['id']}", headers=auth).json()
        return row if row["status"] in ("succeeded", "failed") else None

    finished = wait_for(done, timeout=120, what="the grid job", interval=0.25)
    assert finished["status"] == "succeeded", finished["error"]
    grid = {**finished["result"]}
    assert grid["columns"] == ["weight 0", "weight 0.5", "weight 1"]
    assert grid["rows"] == ["a red square", "a blue circle"]
    check_cells(client, auth, grid)
    # Weight 0 is the base model: the same image as a base cell of another grid.
    base = client.post(
        "/grids",
        headers=auth,
        json={
            "num_inference_steps": 2,
            "seed": 3,
            "prompt": "a blue circle",
            "wait": 120,
            "x": {"axis": "adapter", "values": [None]},
        },
    ).json()
    assert base["rows"] == [""] and base["columns"] == ["base"]
    weightless = pixels(client, auth, grid["cells"][1][0]["image_id"]).astype(int)
    assert np.abs(weightless - pixels(client, auth, base["cells"][0][0]["image_id"])).max() <= 2


def test_a_running_grid_job_cancels(
    client: TestClient, auth: dict[str, str], worker: subprocess.Popen[bytes]
) -> None:
    body = {
        "prompt": "a red square",
        "num_inference_steps": 100,
        "x": {"axis": "seed", "values": list(range(8))},
        "y": {"axis": "prompt", "values": [f"prompt {i}" for i in range(8)]},
    }
    job = client.post("/grids", headers=auth, json=body).json()

    def status() -> str | None:
        value: str = client.get(f"/jobs/{job['id']}", headers=auth).json()["status"]
        return value if value != "queued" else None

    assert wait_for(status, timeout=60, what="the grid job to start", interval=0.05) == "running"
    assert client.post(f"/jobs/{job['id']}/cancel", headers=auth).status_code == 200

    def ended() -> dict[str, Any] | None:
        row: dict[str, Any] = client.get(f"/jobs/{job['id']}", headers=auth).json()
        return row if row["status"] in ("cancelled", "succeeded", "failed") else None

    assert wait_for(ended, timeout=30, what="the grid job to stop", interval=0.1)["status"] == (
        "cancelled"
    )


def test_grid_refusals(client: TestClient, auth: dict[str, str]) -> None:
    axis = {"axis": "seed", "values": [1, 2]}
    cases = [
        ({"prompt": "p", "x": axis, "y": axis}, 422, "validation_error"),
        ({"x": axis}, 422, "validation_error"),  # no prompt
        ({"prompt": "p", "x": {"axis": "weight", "values": [1]}}, 422, "validation_error"),
        ({"prompt": "p", "x": {"axis": "seed", "values": ["a"]}}, 422, "validation_error"),
        (
            {
                "prompt": "p",
                "x": {"axis": "seed", "values": list(range(9))},
                "y": {"axis": "prompt", "values": [str(i) for i in range(8)]},
            },
            422,
            "limit_exceeded",
        ),
        ({"prompt": "p", "x": {"axis": "adapter", "values": ["nope"]}}, 422, "adapter_not_found"),
        ({"prompt": "p", "x": {"axis": "seed", "values": [2**63]}}, 422, "validation_error"),
        ({"prompt": "p" * 2001, "x": axis}, 422, "limit_exceeded"),
    ]
    for body, status, code in cases:
        assert_problem(client.post("/grids", headers=auth, json=body), status, code)
    assert client.get("/jobs?kind=grid", headers=auth).json()["data"] == []
