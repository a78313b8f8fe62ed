"""docker-compose.yml can't run here (no Docker engine); check its services and wiring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def test_compose_has_the_production_services() -> None:
    services = load()["services"]
    assert set(services) >= {"api", "worker", "redis", "postgres", "migrate"}


def test_compose_wiring() -> None:
    compose = load()
    services = compose["services"]
    for name in ("api", "worker", "migrate"):
        env = services[name]["environment"]
        assert env["LORASTACK_DATABASE_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in env["LORASTACK_DATABASE_URL"]
        assert env["LORASTACK_REDIS_URL"].startswith("redis://redis:6379")
    # Migrate once, before anything serves or works.
    assert services["migrate"]["command"] == ["lorastack", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert "artifacts:/data" in services[name]["volumes"]
    assert services["api"]["command"][:3] == ["lorastack", "serve", "--no-worker"]
    assert services["worker"]["command"] == ["lorastack", "worker"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    assert set(compose["volumes"]) >= {"pgdata", "redisdata", "artifacts"}
