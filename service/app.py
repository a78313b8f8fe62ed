"""The FastAPI application. Importing this module never imports torch, diffusers or peft."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from service import __version__
from service.adapters.routes import router as adapters_router
from service.auth import KeyCache
from service.body_limit import BodyLimitMiddleware
from service.config import Settings, get_settings
from service.console.routes import install_console
from service.datasets.routes import router as datasets_router
from service.datasets.service import sweep_ingest_leftovers
from service.db import make_engine, make_session_factory
from service.experiments.routes import router as experiments_router
from service.generation.grid_routes import router as grids_router
from service.generation.routes import router as generation_router
from service.health.routes import router as health_router
from service.jobs.routes import router as jobs_router
from service.notify import DoneListener
from service.problems import install_problem_handlers, install_problem_openapi
from service.queue import TaskSender, make_celery, send_after_commit
from service.ratelimit import RateLimiter, RateLimitHeadersMiddleware
from service.storage import ArtifactStore

log = logging.getLogger(__name__)


def sweep_leftovers(store: ArtifactStore, *, started_at: float) -> None:
    """Remove what crashed processes left half-written (before this process serves)."""
    removed = store.sweep_scratch(started_at=started_at)
    removed += sweep_ingest_leftovers(store, started_at=started_at)
    if removed:
        log.info("removed %d half-written leftovers: %s", len(removed), ", ".join(removed[:20]))


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; engines and clients are created once, in the lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started_at = time.time()
        engine = make_engine(settings.resolved_database_url)
        celery = make_celery(settings)
        app.state.settings = settings
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        app.state.sender = TaskSender(celery, publish_timeout_s=settings.dispatch_publish_timeout_s)
        send_after_commit(app.state.session_factory, app.state.sender)
        app.state.store = ArtifactStore(settings.resolved_artifact_dir)
        sweep_leftovers(app.state.store, started_at=started_at)
        app.state.key_cache = KeyCache(settings.auth_cache_ttl_s)
        app.state.redis = aioredis.Redis.from_url(settings.redis_client_url)
        app.state.rate_limiter = (
            RateLimiter(
                app.state.redis,
                rate=settings.rate_limit_per_s,
                burst=settings.rate_limit_burst,
                key_prefix=settings.redis_key_prefix,
            )
            if settings.rate_limit_per_s > 0
            else None
        )
        app.state.done_listener = DoneListener(app.state.redis, settings)
        await app.state.done_listener.start()
        try:
            yield
        finally:
            await app.state.done_listener.stop()
            await app.state.redis.aclose()
            celery.close()
            engine.dispose()

    app = FastAPI(
        title="lorastack",
        version=__version__,
        summary="Train LoRA adapters for Stable Diffusion and serve them over HTTP.",
        lifespan=lifespan,
        # The reference is served offline by the console package, never from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    install_problem_handlers(app)
    install_problem_openapi(app)
    # Inside the error middleware, outside the routes: oversized bodies are refused unread.
    app.add_middleware(
        BodyLimitMiddleware,
        max_upload_bytes=settings.max_upload_bytes,
        max_json_bytes=settings.max_json_bytes,
    )
    app.add_middleware(RateLimitHeadersMiddleware)
    app.include_router(health_router)
    app.include_router(jobs_router)
    app.include_router(datasets_router)
    app.include_router(generation_router)
    app.include_router(grids_router)
    app.include_router(experiments_router)
    app.include_router(adapters_router)
    install_console(app)
    return app
