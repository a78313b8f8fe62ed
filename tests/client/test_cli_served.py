"""The remote CLI commands as a user runs them (subprocesses) against a real `lorastack serve`:
output, `--json`, exit codes, login, and Ctrl-C while following a job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorastack import AsyncClient, Client
from lorastack.client import models
from tests.client.served import Served, dataset_folder, serve
from tests.conftest import wait_for

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    yield from serve(tmp_path_factory.mktemp("cli-serve"), tiny_model_dir)


@pytest.fixture
def env(served: Served, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTACK_")}
    env.update(
        {
            "LORASTACK_URL": served.url,
            "LORASTACK_API_KEY": served.api_key,
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "COLUMNS": "200",
        }
    )
    return env


def lorastack(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorastack.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def ok_json(*args: str, env: dict[str, str], cwd: Path | None = None) -> Any:
    result = lorastack(*args, "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_the_whole_loop_with_the_cli(env: dict[str, str], served: Served, tmp_path: Path) -> None:
    # login stores URL and key (0600); later commands need no flags or environment
    login = lorastack("login", served.url, "--api-key", served.api_key, env=env)
    assert login.returncode == 0, login.stderr
    config = tmp_path / "config" / "lorastack" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"url": served.url, "api_key": served.api_key}
    env = {k: v for k, v in env.items() if k not in {"LORASTACK_URL", "LORASTACK_API_KEY"}}

    dataset = ok_json(
        "datasets", "upload", str(dataset_folder(tmp_path / "squares")), "--name", "cli", env=env
    )
    assert dataset["status"] == "ready" and dataset["pair_count"] == 4
    shown = lorastack("datasets", "show", dataset["id"], env=env)
    assert shown.returncode == 0 and dataset["id"] in shown.stdout and "pairs" in shown.stdout
    listed = ok_json("datasets", "list", env=env)
    assert dataset["id"] in [d["id"] for d in listed["data"]]

    job = ok_json(
        "train", dataset["id"], "--name", "cli-squares", "--preset", "tiny",
        "-p", "max_steps=10", "-p", "resolution=32", "--wait", env=env,
    )  # fmt: skip
    assert job["status"] == "succeeded" and job["result"]["version"] == 1
    assert job["params"]["hyperparameters"]["rank"] == 4  # from the preset

    logs = lorastack("jobs", "logs", job["id"], env=env)
    assert logs.returncode == 0 and "metrics" in logs.stdout and "succeeded" in logs.stdout
    events = ok_json("jobs", "logs", job["id"], env=env)
    assert events[-1]["data"]["status"] == "succeeded"
    jobs = ok_json("jobs", "list", "--kind", "train", env=env)
    assert job["id"] in [j["id"] for j in jobs["data"]]
    show = lorastack("jobs", "show", job["id"], env=env)
    assert "succeeded" in show.stdout and "cli-squares version 1" in show.stdout

    out = tmp_path / "out.png"
    generated = ok_json(
        "generate", "a red square", "--adapter", "cli-squares@latest:0.8", "--steps", "2",
        "--width", "32", "--height", "32", "--seed", "5", "-o", str(out), env=env,
    )  # fmt: skip
    assert out.read_bytes().startswith(PNG) and generated["images"][0]["path"] == str(out)
    assert generated["adapters"][0]["weight"] == 0.8
    two = lorastack(
        "generate", "a square", "-n", "2", "--steps", "2", "--width", "32", "--height", "32",
        "-o", str(tmp_path / "many.png"), env=env,
    )  # fmt: skip
    assert two.returncode == 0 and "many-1.png" in two.stdout
    assert (tmp_path / "many-0.png").read_bytes().startswith(PNG)

    alias = ok_json("adapters", "alias", "cli-squares", "prod", "1", env=env)
    assert alias["version"] == 1
    version = ok_json("adapters", "show", "cli-squares@prod", env=env)
    assert version["version"] == 1 and "prod" in version["aliases"]
    for fmt in ("diffusers", "kohya"):
        got = ok_json(
            "adapters",
            "download",
            "cli-squares@prod",
            "--format",
            fmt,
            "-o",
            str(tmp_path),
            env=env,
        )
        assert Path(got["path"]).stat().st_size == got["size"] > 1000
    kohya = tmp_path / "cli-squares-prod-kohya.safetensors"
    imported = ok_json(
        "adapters", "import", str(kohya), "--name", "cli-imported", "--base-model", "tiny", env=env
    )
    assert imported["report"]["format"] == "kohya"
    table = lorastack("adapters", "list", env=env)
    assert "cli-squares" in table.stdout and "cli-imported" in table.stdout
    workers = ok_json("workers", env=env)
    assert workers["data"] and "train" in workers["data"][0]["queues"]


def test_exit_codes(env: dict[str, str]) -> None:
    missing = lorastack("jobs", "show", "job_nope", env=env)
    assert missing.returncode == 4 and "404" in missing.stderr
    as_json = lorastack("jobs", "show", "job_nope", "--json", env=env)
    assert as_json.returncode == 4 and json.loads(as_json.stdout)["error"]["status"] == 404
    invalid = lorastack("train", "ds_nope", "--name", "x", "-p", "rank=0", env=env)
    assert invalid.returncode == 4 and "rank" in invalid.stderr
    unreachable = lorastack("workers", "--url", "http://127.0.0.1:9", "--timeout", "2", env=env)
    assert unreachable.returncode == 3
    usage = lorastack("train", "ds_x", env=env)  # --name missing
    assert usage.returncode == 2
    bad_param = lorastack("train", "ds_x", "--name", "x", "-p", "rank", env=env)
    assert bad_param.returncode == 2 and "key=value" in bad_param.stderr
    unconfigured = {k: v for k, v in env.items() if not k.startswith("LORASTACK_")}
    nothing = lorastack("workers", env=unconfigured)
    assert nothing.returncode == 2 and "lorastack login" in nothing.stderr
    for command in (["train", "-h"], ["jobs", "-h"], ["jobs", "logs", "-h"], ["login", "-h"]):
        helped = lorastack(*command, env=env)
        assert helped.returncode == 0 and "example:" in helped.stdout, command


def test_experiments_grids_and_checkpoint_refs_with_the_cli(
    env: dict[str, str], served: Served, tmp_path: Path
) -> None:
    # The evaluation flags reach the server (its refusals) or are refused here (exit 2).
    best_alone = lorastack("train", "ds_nope", "--name", "x", "--publish", "best", env=env)
    assert best_alone.returncode == 4 and "publish" in best_alone.stderr
    unknown = lorastack(
        "train", "ds_nope", "--name", "x", "--eval-prompt", "a", "--select", "beauty:max", env=env
    )
    assert unknown.returncode == 4 and "select" in unknown.stderr
    for usage in (
        ["train", "ds_x", "--name", "x", "--eval-prompt", "a", "--select", "clip_score"],
        ["train", "ds_x", "--name", "x", "--control-prompt", "a tree"],
        ["experiments", "create", "ds_x", "--name", "x", "--grid", "rank"],
        ["grid", "--x", "colour=red", "--prompt", "a", "-o", str(tmp_path / "g.png")],
    ):
        refused = lorastack(*usage, env=env)
        assert refused.returncode == 2, (usage, refused.stderr)

    experiment = ok_json(
        "experiments", "create", str(dataset_folder(tmp_path / "exp")), "--name", "cx",
        "--grid", "rank=2,4", "-p", "max_steps=4", "-p", "checkpoint_every=2",
        "-p", "resolution=32", "-p", "learning_rate=1e-3",
        "--eval-prompt", "a red square", "--control-prompt", "a tree", "--eval-seed", "0",
        "--eval-steps", "1", "--select", "clip_score:min", "--publish", "best",
        "--wait", "--poll", "0.5", env=env,
    )  # fmt: skip
    assert experiment["status"] == "succeeded", experiment
    assert [r["parameters"] for r in experiment["runs"]] == [{"rank": 2}, {"rank": 4}]
    assert experiment["select"] == {"metric": "clip_score", "mode": "min"}
    scores = [r["metrics"]["clip_score"] for r in experiment["runs"]]
    assert experiment["best_run"] == 1 + scores.index(min(scores))
    listed = ok_json("experiments", "list", "--limit", "1", env=env)
    assert [e["id"] for e in listed["data"]] == [experiment["id"]]
    with Client(served.url, served.api_key) as client:
        assert client.experiments.list(after=experiment["id"]).data == []

    async def list_async() -> models.ExperimentList:
        async with AsyncClient(served.url, served.api_key) as aclient:
            return await aclient.experiments.list(limit=5)

    assert [e.id for e in asyncio.run(list_async()).data] == [experiment["id"]]
    shown = lorastack("experiments", "show", experiment["id"], env=env)
    assert shown.returncode == 0 and "cx-2" in shown.stdout and "CLIP_SCORE" in shown.stdout
    report = tmp_path / "runs.csv"
    saved = ok_json("experiments", "report", experiment["id"], "--format", "csv", "-o",
                    str(report), env=env)  # fmt: skip
    assert saved["path"] == str(report)
    rows = report.read_text().splitlines()
    assert rows[0].startswith("run,adapter,rank,status") and len(rows) == 3
    markdown = lorastack("experiments", "report", experiment["id"], env=env)
    assert markdown.returncode == 0 and "Best run:" in markdown.stdout

    # Checkpoint refs: a weight after `ckpt:<step>`, by adapter name or by job id.
    run = experiment["runs"][0]
    for ref in (f"{run['adapter_name']}@ckpt:2:0.5", f"{run['job_id']}@ckpt:4"):
        out = tmp_path / "ckpt.png"
        generated = ok_json(
            "generate", "a red square", "--adapter", ref, "--steps", "1", "--width", "32",
            "--height", "32", "--seed", "1", "-o", str(out), env=env,
        )  # fmt: skip
        assert out.read_bytes().startswith(PNG)
        assert generated["adapters"][0]["weight"] == (0.5 if ref.endswith(":0.5") else 1.0)

    grid_png = tmp_path / "grid.png"
    grid = ok_json(
        "grid", "--x", f"adapter=none,{run['adapter_name']}@ckpt:2,{run['adapter_name']}@best",
        "--y", "seed=1,2", "--prompt", "a red square", "--steps", "1", "--width", "32",
        "--height", "32", "-o", str(grid_png), env=env,
    )  # fmt: skip
    assert grid["status"] == "succeeded" and grid["path"] == str(grid_png)
    name = run["adapter_name"]
    assert grid["columns"] == ["base", f"{name}@ckpt:2", f"{name}@best"]
    assert grid["rows"] == ["seed 1", "seed 2"]
    assert grid_png.read_bytes().startswith(PNG)


def _interruptible() -> None:
    """Ctrl-C reaches the child as on a user's terminal: a shell that started this suite in
    the background (CI) leaves SIGINT ignored, and Python then installs no handler for it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_detaches_off_a_terminal_and_offers_to_cancel_on_one(
    env: dict[str, str], served: Served, tmp_path: Path
) -> None:
    with Client(served.url, served.api_key) as client:
        dataset = client.datasets.upload(dataset_folder(tmp_path / "long"), name="long")
        job = client.jobs.create(
            dataset.id, "long", hyperparameters={"max_steps": 100000, "resolution": 32, "rank": 4}
        )
        assert isinstance(job, models.Job)
        try:
            # Without a terminal: events as lines; Ctrl-C detaches and the job keeps running.
            follower = subprocess.Popen(
                [sys.executable, "-m", "lorastack.cli", "jobs", "logs", "-f", job.id],
                preexec_fn=_interruptible,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert follower.stdout is not None
            first = follower.stdout.readline()  # the first event: it is following
            assert "state" in first or "metrics" in first, first
            follower.send_signal(signal.SIGINT)
            stdout, stderr = follower.communicate(timeout=120)
            assert follower.returncode == 130, stdout + stderr
            assert "detached" in stderr
            assert client.jobs.get(job.id).status in {"queued", "running"}  # not cancelled

            # On a terminal: the live bar; Ctrl-C asks, and "y" cancels the job.
            master, slave = pty.openpty()
            follower = subprocess.Popen(
                [sys.executable, "-m", "lorastack.cli", "jobs", "logs", "-f", job.id],
                preexec_fn=_interruptible,
                env={**env, "TERM": "xterm", "COLUMNS": "160"},
                stdin=slave,
                stdout=slave,
                stderr=slave,
            )
            os.close(slave)
            screen = b""

            def read_until(*needles: bytes, timeout: float = 300) -> None:
                nonlocal screen
                deadline = time.monotonic() + timeout
                while not all(n in screen for n in needles):
                    assert time.monotonic() < deadline, screen[-2000:]
                    ready, _, _ = select.select([master], [], [], 0.5)
                    if ready:
                        try:
                            screen += os.read(master, 65536)
                        except OSError:  # the child closed the terminal
                            break

            try:
                read_until(b"/100000", b"it/s", b"ETA", b"loss")  # the live bar
                follower.send_signal(signal.SIGINT)
                read_until(f"cancel job {job.id}?".encode())
                os.write(master, b"y\n")
                assert follower.wait(timeout=60) == 1
            finally:
                if follower.poll() is None:
                    follower.kill()
                os.close(master)
            assert client.jobs.get(job.id).status in {"cancel_requested", "cancelled"}
            wait_for(
                lambda: client.jobs.get(job.id).status == "cancelled", timeout=300, what="cancel"
            )
        finally:  # never leave a 100000-step job running for the next test
            with contextlib.suppress(Exception):
                client.jobs.cancel(job.id)

    again = ok_json("jobs", "cancel", job.id, env=env)  # asking again is harmless
    assert again["status"] == "cancelled"
    follow_again = lorastack("jobs", "logs", "-f", job.id, "--json", env=env)
    assert follow_again.returncode == 1
    assert json.loads(follow_again.stdout)["status"] == "cancelled"
