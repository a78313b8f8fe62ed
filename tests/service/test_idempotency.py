"""Idempotency keys on real SQL: lookups, reuse with another body, and the first-request race."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.auth import get_or_create_tenant
from service.db import new_id, transaction
from service.errors import Unprocessable
from service.idempotency import IdempotentRequest, request_hash
from service.models import Dataset, IdempotencyKey
from tests.conftest import Stack

SCOPE = "POST /things"


@pytest.fixture
def tenant_id(stack: Stack) -> str:
    with transaction(stack.session_factory) as session:
        return get_or_create_tenant(session, f"idem-{secrets.token_hex(4)}").id


def _resource(session: Session, tenant_id: str) -> str:
    """A row standing for "the resource a request creates" (pending in ``session``)."""
    dataset = Dataset(
        id=new_id("ds"), tenant_id=tenant_id, name="r", sha256="0" * 64, storage_key="k"
    )
    session.add(dataset)
    return dataset.id


def _request(tenant_id: str, key: str, body: dict[str, object]) -> IdempotentRequest:
    return IdempotentRequest(
        tenant_id=tenant_id, scope=SCOPE, key=key, request_hash=request_hash(body)
    )


def test_request_hash_is_canonical() -> None:
    assert request_hash({"a": 1, "b": "x"}) == request_hash({"b": "x", "a": 1})
    assert request_hash({"a": 1}) != request_hash({"a": 2})
    assert len(request_hash({})) == 64


def test_first_request_then_repeat_then_other_body(stack: Stack, tenant_id: str) -> None:
    first = _request(tenant_id, "k1", {"n": 1})
    with transaction(stack.session_factory) as session:
        assert first.find(session) is None
        resource_id = _resource(session, tenant_id)
        assert first.remember(session, resource_id=resource_id) == resource_id
    with stack.session_factory() as session:
        assert first.find(session) == resource_id
        with pytest.raises(Unprocessable) as reused:
            _request(tenant_id, "k1", {"n": 2}).find(session)
    assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")
    assert "k1" in reused.value.detail


def test_keys_are_per_tenant_and_per_scope(stack: Stack, tenant_id: str) -> None:
    with transaction(stack.session_factory) as session:
        other_tenant = get_or_create_tenant(session, f"idem-{secrets.token_hex(4)}").id
        request = _request(tenant_id, "shared", {"n": 1})
        request.remember(session, resource_id=_resource(session, tenant_id))
    with stack.session_factory() as session:
        assert _request(other_tenant, "shared", {"n": 1}).find(session) is None
        other_scope = IdempotentRequest(
            tenant_id=tenant_id, scope="POST /other", key="shared", request_hash="x" * 64
        )
        assert other_scope.find(session) is None


def test_concurrent_first_requests_answer_the_winners_resource(
    stack: Stack, tenant_id: str
) -> None:
    request = _request(tenant_id, "race", {"n": 1})
    winner_session = stack.session_factory()
    loser_session = stack.session_factory()
    try:
        # Both look the key up before either has recorded it.
        assert request.find(winner_session) is None
        assert request.find(loser_session) is None
        winner_id = _resource(winner_session, tenant_id)
        assert request.remember(winner_session, resource_id=winner_id) == winner_id
        winner_session.commit()

        loser_id = _resource(loser_session, tenant_id)
        assert request.remember(loser_session, resource_id=loser_id) == winner_id
        loser_session.commit()  # nothing left to commit: the loser's work was rolled back
    finally:
        winner_session.close()
        loser_session.close()
    with stack.session_factory() as session:
        assert session.get(Dataset, winner_id) is not None
        assert session.get(Dataset, loser_id) is None
        keys = session.scalar(
            select(func.count())
            .select_from(IdempotencyKey)
            .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == "race")
        )
        assert keys == 1


def test_concurrent_first_request_with_another_body_is_422(stack: Stack, tenant_id: str) -> None:
    with transaction(stack.session_factory) as session:
        first = _request(tenant_id, "race2", {"n": 1})
        first.remember(session, resource_id=_resource(session, tenant_id))
    with stack.session_factory() as session:
        late_id = _resource(session, tenant_id)
        with pytest.raises(Unprocessable) as reused:
            _request(tenant_id, "race2", {"n": 2}).remember(session, resource_id=late_id)
        assert reused.value.code == "idempotency_key_reused"
        session.commit()
        assert session.get(Dataset, late_id) is None


def test_other_integrity_errors_are_not_swallowed(stack: Stack, tenant_id: str) -> None:
    with transaction(stack.session_factory) as session:
        taken_id = _resource(session, tenant_id)
    with stack.session_factory() as session:
        session.add(
            Dataset(id=taken_id, tenant_id=tenant_id, name="dup", sha256="1" * 64, storage_key="k")
        )
        with pytest.raises(IntegrityError):
            _request(tenant_id, "k-dup", {"n": 1}).remember(session, resource_id=taken_id)
