"""Idempotency-Key for POSTs that create: a repeat answers the resource the first one created.

A key belongs to (tenant, scope, key); ``scope`` names the route (``"POST /datasets"``) so one
key can be used on two routes. The key's row is inserted in the same transaction as the
resource, so a key never names a resource that was rolled back. The same key with another
request body answers 422 ``idempotency_key_reused``. Keys are kept until their tenant is
deleted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Header
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import Unprocessable
from service.models import IdempotencyKey

REUSED_CODE = "idempotency_key_reused"
# Set (to "true") on an answer that repeats what an earlier request with the same key created.
REPLAYED_HEADER = "Idempotent-Replayed"

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="repeat a request safely: the same key and body answer the first result",
    ),
]


def request_hash(payload: Mapping[str, Any]) -> str:
    """sha256 of the request's canonical JSON: two requests are "the same" when it matches."""
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


@dataclass(frozen=True)
class IdempotentRequest:
    """A create request carrying an Idempotency-Key."""

    tenant_id: str
    scope: str
    key: str
    request_hash: str

    @classmethod
    def of(
        cls, *, tenant_id: str, scope: str, key: str | None, payload: Mapping[str, Any]
    ) -> IdempotentRequest | None:
        """The keyed request, or None when the client sent no Idempotency-Key."""
        if not key:
            return None
        return cls(tenant_id=tenant_id, scope=scope, key=key, request_hash=request_hash(payload))

    def find(self, session: Session) -> str | None:
        """The id of the resource a first request with this key created, or None.

        Raises 422 ``idempotency_key_reused`` when that request had another body.
        """
        row = session.scalar(
            select(IdempotencyKey).where(
                IdempotencyKey.tenant_id == self.tenant_id,
                IdempotencyKey.scope == self.scope,
                IdempotencyKey.key == self.key,
            )
        )
        if row is None:
            return None
        if row.request_hash != self.request_hash:
            raise Unprocessable(
                f"Idempotency-Key {self.key!r} was already used for a different {self.scope} "
                "request; use a new key for a new request",
                code=REUSED_CODE,
            )
        return row.resource_id

    def remember(self, session: Session, *, resource_id: str) -> str:
        """Record the key for ``resource_id`` (flushed; committed with the resource).

        Returns the id the key names: ``resource_id``, or, when a concurrent first request
        with the same key committed first, that request's resource. In that case the session
        has been rolled back (the caller's own resource is discarded) and the caller answers
        with the returned id.
        """
        # Flush the caller's pending rows first, so an IntegrityError below is about the key.
        session.flush()
        session.add(
            IdempotencyKey(
                tenant_id=self.tenant_id,
                scope=self.scope,
                key=self.key,
                request_hash=self.request_hash,
                resource_id=resource_id,
            )
        )
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            winner = self.find(session)
            if winner is None:
                raise
            return winner
        return resource_id


def create_once(
    session: Session,
    *,
    tenant_id: str,
    scope: str,
    key: str | None,
    payload: Mapping[str, Any],
    create: Callable[[], str],
) -> tuple[str, bool]:
    """Run ``create`` (which flushes a resource and returns its id) unless an earlier request
    with this Idempotency-Key did. Returns (resource id, created by this call)."""
    request = IdempotentRequest.of(tenant_id=tenant_id, scope=scope, key=key, payload=payload)
    if request is None:
        return create(), True
    existing = request.find(session)
    if existing is not None:
        return existing, False
    resource_id = create()
    winner = request.remember(session, resource_id=resource_id)
    return winner, winner == resource_id
