"""The registry in SQL: version numbers under concurrency, aliases and their history."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import select

from service import registry
from service.auth import authenticate, create_api_key
from service.db import transaction
from service.errors import Unprocessable
from service.models import Adapter, AdapterAliasEvent, AdapterVersion
from service.storage import StoredObject
from tests.conftest import Stack

STORED = StoredObject(key="adapters/0.safetensors", sha256="0" * 64, size=1)


@pytest.fixture
def tenant_id(stack: Stack) -> str:
    with transaction(stack.session_factory) as session:
        secret = create_api_key(session, tenant_name=f"registry-{secrets.token_hex(4)}")
        principal = authenticate(session, secret)
        assert principal is not None
        return principal.tenant_id


def publish(stack: Stack, tenant_id: str, name: str) -> int:
    with transaction(stack.session_factory) as session:
        version = registry.publish_version(
            session,
            tenant_id=tenant_id,
            adapter_name=name,
            base_model="tiny",
            source="import",
            stored=STORED,
        )
        return version.version


def run_at_once(count: int, target: Callable[[], int]) -> list[int]:
    """Run ``target`` in ``count`` threads released together; each has its own session."""
    barrier = threading.Barrier(count)
    results: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            results.append(target())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return results


def latest_of(stack: Stack, tenant_id: str, name: str) -> tuple[int | None, list[int]]:
    with stack.session_factory() as session:
        adapter = session.scalar(
            select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        )
        assert adapter is not None
        versions = session.scalars(
            select(AdapterVersion.version).where(AdapterVersion.adapter_id == adapter.id)
        ).all()
        latest = registry.alias_target(session, adapter_id=adapter.id, alias=registry.LATEST)
        return latest, sorted(versions)


def test_concurrent_publishes_get_distinct_versions(stack: Stack, tenant_id: str) -> None:
    assert publish(stack, tenant_id, "raced") == 1
    results = run_at_once(2, lambda: publish(stack, tenant_id, "raced"))
    assert sorted(results) == [2, 3]
    latest, versions = latest_of(stack, tenant_id, "raced")
    assert versions == [1, 2, 3] and latest == 3


def test_concurrent_first_publishes_create_one_adapter(stack: Stack, tenant_id: str) -> None:
    results = run_at_once(2, lambda: publish(stack, tenant_id, "fresh"))
    assert sorted(results) == [1, 2]
    latest, versions = latest_of(stack, tenant_id, "fresh")
    assert versions == [1, 2] and latest == 2


def test_alias_names(stack: Stack) -> None:
    for good in ("prod", "v1.2", "canary_eu-west", "2024-01"):
        registry.check_alias_name(good)
    for bad in ("", "Prod", "12", "a b", "x" * 101, "prod@1", "latest"):
        with pytest.raises(Unprocessable):
            registry.check_alias_name(bad)


def test_removing_versions_moves_latest_back_and_keeps_history(
    stack: Stack, tenant_id: str
) -> None:
    for _ in range(3):
        publish(stack, tenant_id, "shrinking")
    with transaction(stack.session_factory) as session:
        adapter = session.scalar(
            select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == "shrinking")
        )
        assert adapter is not None
        registry.move_alias(session, adapter=adapter, alias="prod", version=3, actor="key_a")
        newest = session.scalar(
            select(AdapterVersion).where(
                AdapterVersion.adapter_id == adapter.id, AdapterVersion.version == 3
            )
        )
        assert newest is not None
        removed = registry.remove_version(session, adapter=adapter, version=newest, actor="key_b")
        assert removed == ["prod"]
        assert registry.alias_target(session, adapter_id=adapter.id, alias="latest") == 2
        assert registry.alias_target(session, adapter_id=adapter.id, alias="prod") is None
        moves = [
            (e.alias, e.from_version, e.to_version, e.actor)
            for e in registry.alias_history(session, adapter.id)
        ]
        assert moves[:3] == [
            ("latest", 3, 2, "key_b"),
            ("prod", 3, None, "key_b"),
            ("prod", None, 3, "key_a"),
        ]
        keys = registry.remove_adapter(session, adapter=adapter)
        assert keys == [STORED.key, STORED.key]
        adapter_id = adapter.id
    with stack.session_factory() as session:
        assert session.get(Adapter, adapter_id) is None
        events = session.scalars(
            select(AdapterAliasEvent).where(AdapterAliasEvent.adapter_id == adapter_id)
        ).all()
        assert events == []
