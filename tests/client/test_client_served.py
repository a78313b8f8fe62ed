"""The Python client against a real `lorastack serve`: the whole loop (upload a folder, train
and follow it, generate, download both formats, resume a download), errors as exceptions, and
an idempotent retry after a dropped connection."""

from __future__ import annotations

import asyncio
import http.client
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from safetensors.numpy import load as load_safetensors

from lorastack import (
    AsyncClient,
    AuthenticationError,
    Client,
    NotFound,
    Progress,
    ValidationFailed,
)
from lorastack.client import models
from tests.client.served import TINY, Served, dataset_folder, serve

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    yield from serve(tmp_path_factory.mktemp("client-serve"), tiny_model_dir)


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[Client]:
    with Client(served.url, served.api_key) as c:
        yield c


def test_the_whole_loop_with_the_client(client: Client, tmp_path: Path) -> None:
    # 1. a folder, zipped on the fly, with upload progress
    sent: list[tuple[int, int | None]] = []
    dataset = client.datasets.upload(
        dataset_folder(tmp_path / "squares"),
        name="squares",
        on_progress=lambda d, t: sent.append((d, t)),
    )
    assert dataset.status == "ready" and dataset.pair_count == 4
    assert sent and sent[-1][0] == sent[-1][1] and sent[-1][1] > 0
    assert client.datasets.get(dataset.id).report
    assert dataset.id in [d.id for d in client.datasets.list().data]
    assert client.datasets.thumbnail(dataset.id, 0, size=16).startswith(b"\xff\xd8")  # JPEG

    # 2. train, following the event stream with a progress callback
    job = client.jobs.create(dataset.id, "squares", hyperparameters={**TINY, "checkpoint_every": 5})
    assert isinstance(job, models.Job) and job.status == "queued"
    seen: list[Progress] = []
    events: list[models.JobEvent] = []
    done = client.jobs.wait(job.id, on_progress=seen.append, on_event=events.append, timeout=300)
    assert done.status == "succeeded" and done.result is not None
    assert done.result["version"] == 1
    steps = [p.step for p in seen if p.step is not None]
    assert steps and steps[-1] == 10 and seen[-1].total_steps == 10
    assert steps == sorted(steps)
    assert [e.seq for e in events] == sorted({e.seq for e in events})  # each once, in order
    assert events[-1].type == "state" and events[-1].data["status"] == "succeeded"
    assert {"metrics", "checkpoint"} <= {e.type for e in events}
    assert [e.seq for e in client.jobs.events(job.id, limit=1000).data] == [e.seq for e in events]

    # checkpoints, promotion (idempotent), aliases
    steps_saved = [c.step for c in client.jobs.checkpoints(job.id).data]
    assert 5 in steps_saved
    promoted = client.jobs.promote_checkpoint(job.id, 5)
    assert promoted.created and promoted.version == 2 and promoted.source == "checkpoint"
    assert client.jobs.promote_checkpoint(job.id, 5).created is False
    alias = client.adapters.set_alias("squares", "prod", 1)
    assert alias.version == 1
    assert client.adapters.version("squares", "prod").version == 1
    adapter = client.adapters.get("squares")
    assert adapter.aliases == {"latest": 2, "prod": 1} and adapter.version_count == 2

    # 3. generate with the adapter through its alias
    result = client.generate(
        "a red square",
        adapters=[("squares@prod", 0.8)],
        num_inference_steps=2,
        width=32,
        height=32,
        seed=7,
        num_images=2,
    )
    assert len(result) == 2 and result.generation.adapters[0].version == 1
    assert all(image.data.startswith(PNG) for image in result)
    saved = result[0].save(tmp_path / "square.png")
    assert saved.read_bytes() == result[0].data
    assert result[0].to_pil().size == (32, 32)
    assert client.image(result[1].id) == result[1].data

    # 4. download both formats, with transfer progress
    got: list[int] = []
    diffusers = client.adapters.download(
        "squares", 1, path=tmp_path, on_progress=lambda d, t: got.append(d)
    )
    kohya = client.adapters.download(
        "squares", "prod", format="kohya", path=tmp_path / "k.safetensors"
    )
    assert diffusers.path == tmp_path / "squares-1.safetensors"
    assert got[-1] == diffusers.size == diffusers.path.stat().st_size
    assert diffusers.sha256 == client.adapters.version("squares", 1).sha256
    assert diffusers.resumed_from == 0
    assert any(k.endswith(".lora_down.weight") for k in load_safetensors(kohya.path.read_bytes()))
    assert any("lora_A" in k for k in load_safetensors(diffusers.path.read_bytes()))

    # 5. an interrupted download resumes with a Range request to the same bytes
    whole = kohya.path.read_bytes()
    target = tmp_path / "resumed.safetensors"
    half = len(whole) // 2
    (tmp_path / "resumed.safetensors.part").write_bytes(whole[:half])
    resumed = client.adapters.download("squares", "prod", format="kohya", path=target)
    assert resumed.resumed_from == half
    assert target.read_bytes() == whole
    assert not (tmp_path / "resumed.safetensors.part").exists()

    # a stale part (other bytes) is detected by the ETag check and downloaded again
    (tmp_path / "resumed.safetensors.part").write_bytes(b"\0" * half)
    again = client.adapters.download("squares", "prod", format="kohya", path=target)
    assert target.read_bytes() == whole and again.resumed_from == 0

    # 6. import the kohya file as a new adapter
    imported = client.adapters.import_file(kohya.path, name="squares-imported", base_model="tiny")
    assert imported.version == 1 and imported.report.format == "kohya"
    assert "squares-imported" in [a.name for a in client.adapters.list(prefix="squares").data]

    assert client.workers().data
    assert client.ping(queue="train", wait=30).status == "succeeded"


def test_errors_are_exceptions_with_the_problem(client: Client, served: Served) -> None:
    with pytest.raises(NotFound) as missing:
        client.jobs.get("job_does_not_exist")
    assert missing.value.status == 404 and missing.value.detail
    with pytest.raises(ValidationFailed) as invalid:
        client.jobs.create("ds_missing", "x", hyperparameters={"rank": 0})
    assert invalid.value.status == 422
    assert any("rank" in e.field for e in invalid.value.errors)
    with Client(served.url, "not-a-key") as stranger, pytest.raises(AuthenticationError):
        stranger.datasets.list()


class DroppingProxy:
    """A real HTTP proxy that forwards the first POST /jobs to the server and then closes the
    client's connection without answering: the job exists, but the client never heard."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.posts: list[tuple[str | None, dict[str, Any] | None]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                payload = answer.read()
                conn.close()
                if self.command == "POST" and self.path == "/jobs":
                    import json

                    proxy.posts.append((self.headers.get("Idempotency-Key"), json.loads(payload)))
                    if len(proxy.posts) == 1:
                        self.close_connection = True
                        return  # dropped: nothing goes back
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in {"connection", "transfer-encoding", "content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_retry_after_a_dropped_connection_creates_one_job(
    served: Served, client: Client, tmp_path: Path
) -> None:
    dataset = client.datasets.upload(dataset_folder(tmp_path / "d"), name="dropped")
    proxy = DroppingProxy(served.url)
    try:
        with Client(proxy.url, served.api_key, backoff_s=0.05) as through_proxy:
            job = through_proxy.jobs.create(dataset.id, "dropped", hyperparameters=TINY)
    finally:
        proxy.close()
    assert isinstance(job, models.Job)
    (first_key, first_answer), (second_key, second_answer) = proxy.posts
    assert first_key == second_key and first_key
    assert first_answer is not None and first_answer["id"] == job.id == second_answer["id"]
    jobs = [
        j for j in client.jobs.list(kind="train", limit=100).data if j.adapter_name == "dropped"
    ]
    assert [j.id for j in jobs] == [job.id]
    client.jobs.wait(job.id, timeout=300)


def test_async_client_trains_follows_by_polling_and_downloads(
    served: Served, tmp_path: Path
) -> None:
    folder = dataset_folder(tmp_path / "a")

    async def run() -> tuple[models.Job, list[Progress], bytes]:
        async with AsyncClient(served.url, served.api_key) as aclient:
            dataset = await aclient.datasets.upload(folder, name="async")
            job = await aclient.jobs.create(dataset.id, "async-squares", hyperparameters=TINY)
            assert isinstance(job, models.Job)
            seen: list[Progress] = []
            done = await aclient.jobs.wait(
                job.id, on_progress=seen.append, stream=False, poll_interval=0.2, timeout=300
            )
            file = await aclient.adapters.download("async-squares", path=tmp_path)
            images = await aclient.generate(
                "a square", adapters=["async-squares"], num_inference_steps=2, width=32, height=32
            )
            return done, seen, file.path.read_bytes() + images[0].data[:8]

    done, seen, data = asyncio.run(run())
    assert done.status == "succeeded"
    assert seen and seen[-1].status == "succeeded" and seen[-1].step == 10
    assert data.endswith(PNG) and len(data) > 1000
    assert load_safetensors(io.BytesIO(data[:-8]).getvalue())
