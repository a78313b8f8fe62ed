"""FastAPI dependencies: the request's unit of work, the caller, paging."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth import KeyCache, Principal, hash_key, lookup_key
from service.config import Settings
from service.errors import Unauthorized
from service.ratelimit import STATE_KEY, RateLimiter
from service.storage import ArtifactStore


@dataclass
class UnitOfWork:
    """The request's session. Services flush; the route commits once. Committing sends the
    tasks of the jobs created in it (service.queue), then runs the route's own after-commit
    steps (e.g. deleting a file whose row is gone)."""

    session: Session
    _after_commit: list[Callable[[], Any]] = field(default_factory=list)

    def after_commit(self, fn: Callable[[], Any]) -> None:
        self._after_commit.append(fn)

    def commit(self) -> None:
        self.session.commit()
        pending, self._after_commit = self._after_commit, []
        for fn in pending:
            fn()


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.store
    return store


async def get_uow(request: Request) -> AsyncIterator[UnitOfWork]:
    """The request's unit of work. Creating a session does no I/O, so this runs on the loop."""
    session: Session = request.app.state.session_factory()
    uow = UnitOfWork(session=session)
    try:
        yield uow
    finally:
        # Anything not committed by the route is discarded: a failed request stores nothing.
        # A route that committed (or never touched SQL) holds no connection: nothing to wait on.
        if session.in_transaction():
            await run_in_threadpool(_discard, session)
        else:
            session.close()


def _discard(session: Session) -> None:
    session.rollback()
    session.close()


async def get_principal(
    request: Request, uow: Annotated[UnitOfWork, Depends(get_uow)]
) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized(
            "missing bearer token: send Authorization: Bearer <api key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key_hash = hash_key(secret.strip())
    cache: KeyCache = request.app.state.key_cache
    principal = cache.get(key_hash)
    if principal is None:
        principal = await run_in_threadpool(lookup_key, uow.session, key_hash)
        if principal is None:
            raise Unauthorized("invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        cache.put(key_hash, principal)
    limiter: RateLimiter | None = request.app.state.rate_limiter
    if limiter is not None:
        setattr(request.state, STATE_KEY, await limiter.take(principal.key_id))
    return principal


@dataclass(frozen=True)
class Page:
    limit: int
    after: str | None


async def get_page(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000, description="items per page")] = 50,
    after: Annotated[str | None, Query(max_length=100, description="id to start after")] = None,
) -> Page:
    settings: Settings = request.app.state.settings
    return Page(limit=min(limit, settings.page_limit_max), after=after)


UoW = Annotated[UnitOfWork, Depends(get_uow)]
Caller = Annotated[Principal, Depends(get_principal)]
Paging = Annotated[Page, Depends(get_page)]
Store = Annotated[ArtifactStore, Depends(get_store)]
AppSettings = Annotated[Settings, Depends(get_settings_dep)]
