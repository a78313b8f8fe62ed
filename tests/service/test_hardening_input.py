"""Hostile and odd input answers 4xx problem+json, never a 500, and the contract holds.

Each case here was a 500, a leak or a drift seen on PostgreSQL + Redis: NUL characters and
lone surrogates reaching SQL, non-finite floats, integers past a column's range, a Range header
of thousands of digits, JSON bodies buffered without a cap, another tenant's adapters in
/workers, and headers or schemas that did not say what the API does.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.storage import ArtifactStore, scratch_prefix
from tests.conftest import Stack, upload_dataset, wait_for
from tests.service.test_app import assert_problem

Headers = dict[str, str]
SMALL = {"num_inference_steps": 2, "guidance_scale": 5.0, "width": 32, "height": 32}


def field_error(response: Any, field: str, kind: str | None = None) -> dict[str, Any]:
    """Assert a 422 problem naming ``field`` (and the error type, when given)."""
    body = assert_problem(response, 422, "validation_error")
    first = body["errors"][0]
    assert first["field"] == field, body
    if kind is not None:
        assert first["type"] == kind, body
    assert body["detail"].startswith(f"{field}:")
    return body


def post_json(client: TestClient, path: str, raw: str, headers: Headers) -> Any:
    return client.post(
        path, content=raw.encode(), headers={**headers, "Content-Type": "application/json"}
    )


# --- NUL characters and other strings SQL cannot store -------------------------------------


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/jobs?after=%00", "after"),
        ("/adapters?prefix=a%00b", "prefix"),
        ("/adapters?base_model=%00", "base_model"),
        ("/datasets?after=x%00", "after"),
        ("/jobs?undeclared=%00", "undeclared"),
        ("/jobs/job_%00", "job_id"),
        ("/datasets/%00", "dataset_id"),
        ("/adapters/a%00", "name"),
        ("/adapters/a/versions/%00", "version"),
        ("/images/%00", "image_id"),
        ("/jobs/%00/events", "job_id"),
    ],
)
def test_nul_in_query_and_path_is_422_naming_the_field(
    client: TestClient, auth: Headers, path: str, field: str
) -> None:
    field_error(client.get(path, headers=auth), field, "string_nul_character")


def test_nul_and_lone_surrogates_in_json_are_422_naming_the_field(
    client: TestClient, auth: Headers
) -> None:
    body = post_json(client, "/generate", '{"prompt": "a\\u0000b", "wait": 0}', auth)
    field_error(body, "prompt", "string_nul_character")
    nested = '{"prompt": "x", "wait": 0, "adapters": [{"ref": "a\\u0000"}]}'
    field_error(post_json(client, "/generate", nested, auth), "adapters.0.ref")
    surrogate = post_json(client, "/generate", '{"prompt": "\\ud800", "wait": 0}', auth)
    field_error(surrogate, "prompt", "string_unicode")
    in_a_key = post_json(client, "/generate", '{"prompt": "x", "a\\u0000": 1}', auth)
    assert_problem(in_a_key, 422, "validation_error")
    openai = post_json(client, "/v1/images/generations", '{"prompt": "\\u0000"}', auth)
    assert openai.status_code == 422
    assert openai.json()["error"]["param"] == "prompt"


def test_nul_in_form_fields_is_422_and_stores_nothing(
    stack: Stack, client: TestClient, auth: Headers
) -> None:
    from tests.conftest import make_pairs_zip

    for fields, field in [
        ({"name": "bad\x00name"}, "name"),
        ({"name": "ok", "caption": "a\x00"}, "caption"),
        ({"name": "ok", "trigger_word": "\x00"}, "trigger_word"),
    ]:
        response = client.post(
            "/datasets",
            headers=auth,
            data=fields,
            files={"file": ("squares.zip", make_pairs_zip(2), "application/zip")},
        )
        field_error(response, field, "string_nul_character")
    # HTTP clients escape a NUL in a file name; a hand-made body keeps it.
    parts = [
        'Content-Disposition: form-data; name="name"\r\n\r\nnul',
        'Content-Disposition: form-data; name="base_model"\r\n\r\ntiny',
        'Content-Disposition: form-data; name="file"; filename="a\x00.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n12345678",
    ]
    raw = "".join(f"--b0undary\r\n{part}\r\n" for part in parts) + "--b0undary--\r\n"
    bad_filename = client.post(
        "/adapters/import",
        headers={**auth, "Content-Type": "multipart/form-data; boundary=b0undary"},
        content=raw.encode(),
    )
    field_error(bad_filename, "file", "string_nul_character")
    assert client.get("/datasets", headers=auth).json()["data"] == []
    store = ArtifactStore(stack.settings.resolved_artifact_dir)
    own = scratch_prefix("upload")
    assert not [p for p in store.scratch_root().iterdir() if p.name.startswith(own)]


def test_nul_in_a_header_is_refused(client: TestClient, auth: Headers) -> None:
    # HTTP clients refuse to send it; an ASGI server may still deliver it.
    scope_headers = [(b"authorization", auth["Authorization"].encode()), (b"x-a", b"a\x00")]
    response = _raw_asgi_get(client, "/jobs", scope_headers)
    assert response[0] == 422
    assert response[1]["errors"][0]["field"] == "x-a"


def _raw_asgi_get(
    client: TestClient, path: str, headers: list[tuple[bytes, bytes]]
) -> tuple[int, dict[str, Any]]:
    """Drive the app directly (inside the client's running lifespan) with raw headers."""
    from starlette.types import Message

    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


# --- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"alpha": Infinity}', "hyperparameters.alpha"),
        ('{"snr_gamma": Infinity}', "hyperparameters.snr_gamma"),
        ('{"snr_gamma": 1e400}', "hyperparameters.snr_gamma"),
        ('{"learning_rate": NaN}', "hyperparameters.learning_rate"),
        ('{"noise_offset": -Infinity}', "hyperparameters.noise_offset"),
    ],
)
def test_non_finite_floats_are_422(client: TestClient, auth: Headers, raw: str, field: str) -> None:
    body = '{"dataset_id": "ds_x", "adapter_name": "a", "hyperparameters": ' + raw + "}"
    field_error(post_json(client, "/jobs", body, auth), field, "finite_number")


def test_non_finite_floats_in_generate_and_a_huge_integer_are_422(
    client: TestClient, auth: Headers
) -> None:
    field_error(post_json(client, "/generate", '{"prompt": "x", "wait": NaN}', auth), "wait")
    scale = '{"prompt": "x", "guidance_scale": Infinity}'
    field_error(post_json(client, "/generate", scale, auth), "guidance_scale")
    huge = '{"prompt": "x", "seed": ' + "9" * 5000 + "}"
    assert_problem(post_json(client, "/generate", huge, auth), 422, "validation_error")
    deep = "[" * 100_000 + "]" * 100_000
    assert_problem(post_json(client, "/generate", deep, auth), 422, "validation_error")


def test_integers_past_the_column_range_are_422_plain_and_streamed(
    client: TestClient, auth: Headers
) -> None:
    job = client.post("/ping?wait=0", headers=auth).json()
    events = f"/jobs/{job['id']}/events?after=2147483648"
    field_error(client.get(events, headers=auth), "after")
    streamed = client.get(events, headers={**auth, "Accept": "text/event-stream"})
    field_error(streamed, "after")
    resumed = {**auth, "Accept": "text/event-stream", "Last-Event-ID": "2147483648"}
    field_error(client.get(f"/jobs/{job['id']}/events", headers=resumed), "Last-Event-ID")
    last = client.get(f"/jobs/{job['id']}/events?after=2147483647", headers=auth)
    assert last.status_code == 200 and last.json()["data"] == []
    promote = client.post(f"/jobs/{job['id']}/checkpoints/2147483648/promote", headers=auth)
    field_error(promote, "step")
    version = client.get("/adapters/none/versions/99999999999999999999999", headers=auth)
    assert version.status_code == 404


def test_a_range_header_of_thousands_of_digits_is_answered(
    stack: Stack, client: TestClient, auth: Headers, lora_file: Path
) -> None:
    name = f"range-{secrets.token_hex(3)}"
    _import(client, auth, lora_file, name)
    url = f"/adapters/{name}/versions/1/download"
    size = len(client.get(url, headers=auth).content)
    digits = "9" * 5000
    tail = client.get(url, headers={**auth, "Range": f"bytes=0-{digits}"})
    assert tail.status_code == 206 and len(tail.content) == size
    assert tail.headers["content-range"] == f"bytes 0-{size - 1}/{size}"
    assert_problem(
        client.get(url, headers={**auth, "Range": f"bytes={digits}-"}),
        416,
        "range_not_satisfiable",
    )
    suffix = client.get(url, headers={**auth, "Range": f"bytes=-{digits}"})
    assert suffix.status_code == 206 and len(suffix.content) == size


def test_openai_size_zero_is_an_openai_422(client: TestClient, auth: Headers) -> None:
    for size in ("0x0", "0x8", "8x0", "12x16"):
        response = client.post(
            "/v1/images/generations", headers=auth, json={"prompt": "x", "size": size}
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "size" and "multiple" in error["message"]
        assert error["type"] == "invalid_request_error"


# --- JSON body cap -----------------------------------------------------------------------------


def test_json_bodies_have_their_own_small_cap(stack: Stack) -> None:
    settings = stack.settings.model_copy(update={"max_json_bytes": 4096})
    with TestClient(create_app(settings)) as small:
        big = '{"prompt": "' + "x" * 5000 + '"}'
        json_type = {"Content-Type": "application/json"}
        declared = small.post("/generate", content=big, headers=json_type)
        body = assert_problem(declared, 413, "body_too_large")
        assert body["max_json_bytes"] == 4096 and declared.headers["connection"] == "close"

        def chunks() -> Any:
            for _ in range(10):
                yield b"x" * 1000

        streamed = small.post("/generate", content=chunks(), headers={"Content-Type": "text/plain"})
        assert_problem(streamed, 413, "body_too_large")
        openai = small.post("/v1/images/generations", content=big)
        assert openai.status_code == 413 and openai.json()["error"]["code"] == "body_too_large"
        # Uploads keep the upload cap: a multipart body over the JSON cap reaches the route.
        upload = small.post(
            "/datasets", data={"name": "n"}, files={"file": ("a.zip", b"z" * 8000, "x/y")}
        )
        assert_problem(upload, 401, "unauthorized")


# --- contract ----------------------------------------------------------------------------------


def test_405_allow_lists_every_method_of_the_path(client: TestClient, auth: Headers) -> None:
    response = client.put("/adapters/some-name", headers=auth)
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "DELETE, GET"
    assert client.patch("/jobs", headers=auth).headers["allow"] == "GET, POST"


def test_replays_say_so_and_a_queued_202_has_its_position(
    stack: Stack, client: TestClient, auth: Headers
) -> None:
    for proc in list(stack.workers):
        stack.stop_worker(proc)  # nothing takes the jobs: they stay queued
    key = {**auth, "Idempotency-Key": f"gen-{secrets.token_hex(4)}"}
    body = {"prompt": "a cat", "wait": 0, **SMALL}
    first = client.post("/generate", headers=key, json=body)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    assert first.json()["status"] == "queued" and first.json()["queue_position"] >= 1
    again = client.post("/generate", headers=key, json=body)
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["queue_position"] == first.json()["queue_position"]

    dataset_id = upload_dataset(client, auth, count=2)
    train = {
        "dataset_id": dataset_id,
        "adapter_name": "replayed",
        "hyperparameters": {"max_steps": 1, "resolution": 64, "rank": 4},
    }
    train_key = {**auth, "Idempotency-Key": f"train-{secrets.token_hex(4)}"}
    one = client.post("/jobs", headers=train_key, json=train)
    assert one.status_code == 201 and "idempotent-replayed" not in one.headers
    assert one.json()["queue_position"] >= 1
    two = client.post("/jobs", headers=train_key, json=train)
    assert two.status_code == 201 and two.headers["idempotent-replayed"] == "true"
    for job_id in (first.json()["id"], one.json()["id"]):
        assert client.post(f"/jobs/{job_id}/cancel", headers=auth).status_code == 200


def test_openapi_declares_problem_json_for_every_error_status(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "Problem" in spec["components"]["schemas"]
    public = {"/healthz", "/readyz"}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            expected = {"413", "422", "500"} | (set() if path in public else {"401"})
            if "{" in path:
                expected.add("404")
            assert expected <= set(responses), (method, path, sorted(responses))
            media = "application/json" if path.startswith("/v1/") else "application/problem+json"
            schema = "OpenAIError" if path.startswith("/v1/") else "Problem"
            for status, answer in responses.items():
                if int(status) >= 400:
                    ref = answer["content"][media]["schema"]["$ref"]
                    assert ref.endswith(f"/{schema}"), (method, path, status)
    assert {"404", "409", "415", "429"} <= set(spec["paths"]["/jobs"]["post"]["responses"])
    assert "415" in spec["paths"]["/datasets"]["post"]["responses"]
    assert "503" in spec["paths"]["/generate"]["post"]["responses"]


def test_v1_errors_are_openai_shaped(client: TestClient, auth: Headers) -> None:
    unauthorized = client.post("/v1/images/generations", json={"prompt": "x"})
    assert unauthorized.status_code == 401
    assert unauthorized.headers["content-type"].startswith("application/json")
    error = unauthorized.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "unauthorized"
    assert error["message"] and error["param"] is None
    missing = client.post("/v1/images/generations", headers=auth, json={"n": 1})
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "prompt"
    unknown = client.post(
        "/v1/images/generations", headers=auth, json={"prompt": "x", "model": "no-such"}
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/nothing", headers=auth).json()["error"]["code"] == "not_found"


# --- /workers shows a tenant only its own ------------------------------------------------------


def test_workers_show_only_the_callers_adapters_and_jobs(
    stack: Stack,
    client: TestClient,
    auth: Headers,
    other_auth: Headers,
    worker: Any,
    lora_file: Path,
) -> None:
    name = f"mine-{secrets.token_hex(3)}"
    version = _import(client, auth, lora_file, name)
    generated = client.post(
        "/generate",
        headers=auth,
        json={"prompt": "a cat", "adapters": [{"ref": name, "weight": 0.7}], **SMALL},
    )
    assert generated.status_code == 200, generated.text

    def own_view(headers: Headers) -> list[dict[str, Any]]:
        answer = client.get("/workers", headers=headers)
        assert answer.status_code == 200, answer.text
        # Aggregate counts per queue, whatever tenant queued them (no ids, no names).
        lengths = answer.json()["queue_lengths"]
        assert all(isinstance(n, int) and n >= 0 for n in lengths.values())
        return [w for w in answer.json()["data"] if w["id"] == stack.worker_row(worker.pid).id]

    mine = wait_for(
        lambda: [w for w in own_view(auth) if w["info"].get("inference", {}).get("active")],
        timeout=30,
        what="the worker to report the active adapter",
    )
    active = mine[0]["info"]["inference"]["active"]
    assert [a["weight"] for a in active] == [0.7]
    assert version["sha256"] in active[0]["key"]  # content-addressed artifact key
    theirs = own_view(other_auth)[0]
    inference = theirs["info"]["inference"]
    assert inference["active"] == []
    for tier in inference["cache"].values():
        assert tier["entries"] == []
    # Counts and bytes are shared figures: they still say something is cached.
    assert sum(tier["count"] for tier in inference["cache"].values()) >= 1
    serialized = json.dumps(theirs)
    assert active[0]["key"] not in serialized
    assert theirs["current_job_id"] is None


# --- leftovers of a crash ----------------------------------------------------------------------


def _dead_pid() -> int:
    """A pid that no process has now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid += 1


def test_start_up_removes_what_dead_processes_left_and_keeps_live_ones(stack: Stack) -> None:
    store = ArtifactStore(stack.settings.resolved_artifact_dir)
    scratch = store.scratch_root()
    host = socket.gethostname()
    old = time.time() - 3600
    dead = scratch / f"upload-{host}.{_dead_pid()}-abc123"
    dead.mkdir()
    (dead / "upload.zip").write_bytes(b"half a zip")
    untagged = scratch / "tmpq1w2e3"
    untagged.write_bytes(b"half a file")
    legacy = store.path("datasets") / ".ds_legacy.k2j3.ingest"
    (legacy / "images").mkdir(parents=True)
    (legacy / "images" / "000000.png").write_bytes(b"half an image")
    # A live process's entries (this one's), old and fresh, and another host's recent one.
    live_old = scratch / f"{scratch_prefix('upload')}live01"
    live_old.mkdir()
    foreign = scratch / "upload-elsewhere.example.12-zzz999"
    foreign.write_bytes(b"another host's")
    for path in (dead / "upload.zip", dead, untagged, legacy / "images" / "000000.png"):
        os.utime(path, (old, old))
    for path in (legacy / "images", legacy, live_old, foreign):
        os.utime(path, (old, old))

    with TestClient(create_app(stack.settings)):
        fresh = scratch / "upload-written.after.start-1"
        fresh.write_bytes(b"")  # made after start-up: not its business
    assert not dead.exists() and not untagged.exists() and not legacy.exists()
    assert live_old.exists() and foreign.exists() and fresh.exists()
    for path in (live_old, foreign, fresh):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import StableDiffusionPipeline

    from tests.fixtures.random_lora import RandomLoraSpec, RandomLoraWriter

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp("hardening-lora") / "a.safetensors"
    path: Path = RandomLoraWriter(pipe).write(out, RandomLoraSpec(rank=4, alpha=8.0), seed=3)
    return path


def _import(client: TestClient, auth: Headers, path: Path, name: str) -> dict[str, Any]:
    response = client.post(
        "/adapters/import",
        headers=auth,
        data={"name": name, "base_model": "tiny"},
        files={"file": ("a.safetensors", path.read_bytes(), "application/octet-stream")},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body
