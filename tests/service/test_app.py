"""The HTTP surface every route shares: auth, problem+json, tenancy, OpenAPI, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

PROBLEM = "application/problem+json"
REPO = Path(__file__).resolve().parents[2]


def assert_problem(response, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["title"] and body["detail"] and body["type"].endswith(code)
    return body


def test_healthz_needs_no_key(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_routes_answer_401_without_a_valid_key(client: TestClient) -> None:
    for method, path in [
        ("GET", "/jobs"),
        ("GET", "/workers"),
        ("POST", "/ping"),
        ("GET", "/jobs/job_x"),
        ("POST", "/jobs/job_x/cancel"),
    ]:
        body = assert_problem(client.request(method, path), 401, "unauthorized")
        assert "Bearer" in body["detail"]
        bad = client.request(method, path, headers={"Authorization": "Bearer lsk_nope"})
        assert_problem(bad, 401, "unauthorized")
        assert bad.headers["www-authenticate"] == "Bearer"


def test_unknown_route_is_problem_json(client: TestClient, auth: dict[str, str]) -> None:
    body = assert_problem(client.get("/no/such/route", headers=auth), 404, "not_found")
    assert "/no/such/route" in body["detail"]
    assert_problem(client.delete("/healthz"), 405, "method_not_allowed")


def test_validation_errors_are_problem_json_naming_the_field(
    client: TestClient, auth: dict[str, str]
) -> None:
    body = assert_problem(client.get("/jobs?limit=0", headers=auth), 422, "validation_error")
    assert body["errors"][0]["field"] == "limit"
    assert body["detail"].startswith("limit:")
    body = assert_problem(client.get("/jobs?status=bogus", headers=auth), 422, "validation_error")
    assert body["errors"][0]["field"] == "status"


def test_another_tenants_job_is_404(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str]
) -> None:
    job = client.post("/ping?wait=0", headers=auth).json()
    assert client.get(f"/jobs/{job['id']}", headers=auth).status_code == 200
    assert_problem(client.get(f"/jobs/{job['id']}", headers=other_auth), 404, "not_found")
    assert_problem(client.post(f"/jobs/{job['id']}/cancel", headers=other_auth), 404, "not_found")
    assert_problem(client.get(f"/jobs/{job['id']}/events", headers=other_auth), 404, "not_found")
    listed = client.get("/jobs", headers=other_auth).json()
    assert job["id"] not in [j["id"] for j in listed["data"]]


def test_list_pages_with_after_and_has_more(client: TestClient, auth: dict[str, str]) -> None:
    ids = [client.post("/ping?wait=0", headers=auth).json()["id"] for _ in range(3)]
    first = client.get("/jobs?limit=2", headers=auth).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    rest = client.get(f"/jobs?limit=2&after={first['data'][-1]['id']}", headers=auth).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False


def test_importing_the_api_does_not_import_torch() -> None:
    code = (
        "import sys, service.app, lorastack.cli, service.openapi; "
        "service.app.create_app(); "
        "print(sorted(m for m in ('torch','diffusers','peft','transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_committed_openapi_matches_the_app() -> None:
    from service.openapi import render

    committed = (REPO / "openapi" / "openapi.json").read_text()
    assert json.loads(committed) == json.loads(render()), "run `make openapi` and commit"
    ops = [
        op["operationId"]
        for path in json.loads(committed)["paths"].values()
        for op in path.values()
    ]
    assert len(ops) == len(set(ops)) and "get_job" in ops
