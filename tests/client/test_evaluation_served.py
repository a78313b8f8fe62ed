"""Evaluation out of the box on the embedded default (`lorastack serve`: SQLite, embedded Redis,
the tiny model, tiny evaluators built on first use), driven by the Python client: an
experiment of two evaluated runs, its report, and a grid over the best checkpoint."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorastack import Client
from lorastack.client import models
from tests.client.served import TINY, Served, dataset_folder, serve
from tests.conftest import wait_for

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    yield from serve(tmp_path_factory.mktemp("eval-serve"), tiny_model_dir)


def test_experiment_and_grid_on_the_embedded_default(served: Served, tmp_path: Path) -> None:
    with Client(served.url, served.api_key) as client:
        dataset = client.datasets.upload(dataset_folder(tmp_path / "squares"), name="squares")
        experiment = client.experiments.create(
            {
                "dataset_id": dataset.id,
                "adapter_name": "emb",
                "hyperparameters": {**TINY, "max_steps": 4, "checkpoint_every": 2},
                "evaluation": {
                    "prompts": ["a red square"],
                    "control_prompts": ["a tree"],
                    "seeds": [0],
                    "num_inference_steps": 2,
                },
                "grid": {"rank": [2, 4]},
            }
        )
        assert [r.parameters for r in experiment.runs] == [{"rank": 2}, {"rank": 4}]

        def ended() -> models.Experiment | None:
            view = client.experiments.get(experiment.id)
            return view if view.status not in ("queued", "running") else None

        view = wait_for(ended, timeout=300, what="the experiment", interval=0.5)
        assert view.status == "succeeded"
        assert view.select == {"metric": "clip_score", "mode": "max"}
        assert all(r.status == "succeeded" and "clip_score" in r.metrics for r in view.runs)
        scores = [r.metrics["clip_score"] for r in view.runs]
        assert view.best_run == 1 + scores.index(max(scores))
        table = list(csv.DictReader(io.StringIO(client.experiments.report(view.id, format="csv"))))
        assert [row["rank"] for row in table] == ["2", "4"]
        # The tiny evaluators were built once, in the data dir.
        evaluators = served.data_dir / "models" / "evaluators"
        assert (evaluators / "clip" / "config.json").is_file()
        assert (evaluators / "dino" / "config.json").is_file()

        best = view.runs[view.best_run - 1]
        grid = client.grid(
            {
                "prompt": "a red square",
                "seed": 1,
                "num_inference_steps": 2,
                "x": {"axis": "adapter", "values": [None, f"{best.adapter_name}@best"]},
                "wait": 120,
            }
        )
        assert isinstance(grid, models.Grid) and grid.status == "succeeded"
        assert grid.columns == ["base", f"{best.adapter_name}@best"]
        assert grid.image_id is not None and client.image(grid.image_id).startswith(PNG)
        assert len(grid.cells[0]) == 2
