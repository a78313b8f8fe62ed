"""Server-side commands of ``lorastack``: serve, worker, keys, init-model, plan, migrate.

This is the composition root: it may import both ``service`` and ``workers`` (each lazily, in
the command that needs it). The serve process runs the API (uvicorn) and so never imports
torch; the tiny model is built and the worker runs in child processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from service.config import Settings, SettingsError, get_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
# Child processes run this same command line through the current interpreter.
CLI_MODULE = "lorastack.cli"


def fail(message: str) -> NoReturn:
    print(f"lorastack: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_settings() -> Settings:
    """Settings, checked; any problem ends the process with one clear line."""
    try:
        settings = get_settings()
        settings.check()
    except ValidationError as exc:
        err = exc.errors()[0]
        field = "LORASTACK_" + ".".join(str(p) for p in err["loc"]).upper()
        fail(f"{field}: {err['msg']}")
    except SettingsError as exc:
        fail(str(exc))
    return settings


def check_database(settings: Settings) -> None:
    from sqlalchemy import text

    from service.db import make_engine

    url = settings.resolved_database_url
    kwargs = {} if url.startswith("sqlite") else {"connect_args": {"connect_timeout": 5}}
    try:
        engine = make_engine(url, **kwargs)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        fail(f"cannot reach the database ({_redact(url)}): {reason}")


def check_redis(settings: Settings) -> None:
    import redis

    try:
        client = redis.Redis.from_url(settings.redis_client_url, socket_connect_timeout=5)
        client.ping()
        client.close()
    except Exception as exc:
        fail(f"cannot reach Redis ({_redact(settings.redis_client_url)}): {exc}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def migrate(settings: Settings) -> None:
    """alembic upgrade head on the configured database."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.attributes["database_url"] = settings.resolved_database_url
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def ensure_tiny_model(settings: Settings) -> None:
    """With no base model configured, build the tiny one once (in a child process: torch)."""
    if settings.base_models or (settings.tiny_model_dir / "model_index.json").exists():
        return
    print(f"building the tiny base model in {settings.tiny_model_dir} ...", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            CLI_MODULE,
            "init-model",
            "--preset",
            "tiny",
            str(settings.tiny_model_dir),
        ],
        check=True,
    )


def dev_api_key(settings: Settings) -> str:
    """The embedded default's key, kept in the data dir so every serve prints the same one."""
    from service.auth import authenticate, create_api_key
    from service.db import make_engine, make_session_factory, transaction

    key_file = settings.data_dir / "api_key"
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            if key_file.exists():
                secret = key_file.read_text().strip()
                if authenticate(session, secret) is not None:
                    return secret
            secret = create_api_key(session, tenant_name="default", name="lorastack serve")
        key_file.write_text(secret + "\n")
        key_file.chmod(0o600)
        return secret
    finally:
        engine.dispose()


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["LORASTACK_DATA_DIR"] = str(settings.data_dir.resolve())
    return env


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.app import create_app
    from service.embedded_redis import EmbeddedRedis, EmbeddedRedisError

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    check_database(settings)
    # uvicorn re-raises the signal that stopped it; with these handlers that unwinds through
    # the finally below, so the worker and Redis are always stopped too.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    embedded: EmbeddedRedis | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        if settings.embedded_redis:
            embedded = EmbeddedRedis(
                socket_path=settings.embedded_redis_socket, data_dir=settings.data_dir.resolve()
            )
            try:
                embedded.start()
            except EmbeddedRedisError as exc:
                fail(str(exc))
        else:
            check_redis(settings)
        migrate(settings)
        ensure_tiny_model(settings)
        key = dev_api_key(settings)
        if not args.no_worker:
            worker = subprocess.Popen(
                [sys.executable, "-m", CLI_MODULE, "worker", "--log-level", args.log_level],
                env=child_env(settings),
                start_new_session=True,  # Ctrl-C reaches us; we stop the worker in order
            )
        _print_banner(settings, url=f"http://{args.host}:{args.port}", key=key)
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings),
                host=args.host,
                port=args.port,
                log_level=args.log_level,
                lifespan="on",
            )
        )
        server.run()  # returns on SIGINT/SIGTERM after a graceful shutdown
    finally:
        if worker is not None:
            _stop_worker(worker)
        if embedded is not None:
            embedded.stop()
        print("lorastack stopped", flush=True)


def _print_banner(settings: Settings, *, url: str, key: str) -> None:
    print(f"lorastack serving on {url}", flush=True)
    print(f"  console:  {url}/console (sign in with the API key below)", flush=True)
    print(f"  database: {_redact(settings.resolved_database_url)}", flush=True)
    print(f"  redis:    {settings.broker_url}", flush=True)
    print(f"  try:      curl -H 'Authorization: Bearer {key}' {url}/readyz", flush=True)
    print(f"API key: {key}", flush=True)


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # Celery warm shutdown
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def cmd_worker(args: argparse.Namespace) -> None:
    import socket

    settings = load_settings()
    check_database(settings)
    check_redis(settings)
    from workers.celery_app import app

    app.worker_main(
        [
            "worker",
            f"--loglevel={args.log_level.upper()}",
            "-Q",
            args.queues,
            # One process per GPU: the task runs in the process that holds the warm model.
            "--pool=solo",
            "-n",
            f"lorastack-{os.getpid()}@{socket.gethostname()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def cmd_keys_create(args: argparse.Namespace) -> None:
    from service.auth import create_api_key
    from service.db import make_engine, make_session_factory, transaction

    settings = load_settings()
    check_database(settings)
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_session_factory(engine)) as session:
        secret = create_api_key(session, tenant_name=args.tenant, name=args.name)
    engine.dispose()
    print(f"created an API key for tenant {args.tenant!r} (shown once; store it now):")
    print(secret)


def cmd_keys_list(args: argparse.Namespace) -> None:
    from service.auth import list_api_keys
    from service.db import make_engine, make_session_factory, transaction

    settings = load_settings()
    check_database(settings)
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_session_factory(engine)) as session:
        rows = [
            (
                key.id,
                key.tenant.name,
                key.prefix + "...",
                key.name or "",
                key.created_at.strftime("%Y-%m-%d %H:%M"),
                "revoked" if key.revoked else "active",
            )
            for key in list_api_keys(session, tenant_name=args.tenant)
        ]
    engine.dispose()
    header = ("id", "tenant", "key", "name", "created (UTC)", "status")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    from service.auth import revoke_api_key
    from service.db import make_engine, make_session_factory, transaction

    settings = load_settings()
    check_database(settings)
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_session_factory(engine)) as session:
        key = revoke_api_key(session, args.key_id)
        tenant = key.tenant.name if key is not None else None
    engine.dispose()
    if tenant is None:
        fail(f"no API key {args.key_id!r} (see `lorastack keys list`)")
    print(
        f"revoked {args.key_id} of tenant {tenant!r}: refused by every API process within "
        f"LORASTACK_AUTH_CACHE_TTL_S ({settings.auth_cache_ttl_s:g} s)"
    )


def cmd_init_model(args: argparse.Namespace) -> None:
    from workers.engine.model_builder import build_pipeline_folder
    from workers.engine.text.builder import TEXT_PRESETS, build_text_classifier_folder

    out = Path(args.dir)
    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty")
    if args.preset in TEXT_PRESETS:
        build_text_classifier_folder(args.preset, out, seed=args.seed)
        print(f"wrote a randomly initialised {args.preset} text classifier to {out}")
        return
    build_pipeline_folder(args.preset, out, seed=args.seed)
    print(f"wrote a randomly initialised {args.preset} pipeline to {out}")


def cmd_migrate(_: argparse.Namespace) -> None:
    settings = load_settings()
    check_database(settings)
    migrate(settings)
    print("database is at the latest migration")


def cmd_plan(args: argparse.Namespace) -> None:
    """Plan a training run: a JSON request on stdin, one JSON line out; with --serve, one
    answer per request line until stdin closes (the API's resident planner)."""
    import json

    from workers.planning import plan_from_request, serve_stdio

    if args.serve:
        serve_stdio()
        return
    print(json.dumps(plan_from_request(json.loads(sys.stdin.read()))))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the server-side commands to the ``lorastack`` parser."""
    serve = sub.add_parser("serve", help="API + one worker (+ embedded Redis / SQLite by default)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="run the API only")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run one worker against the configured URLs")
    worker.add_argument("--queues", default="train,generate")
    worker.add_argument("--log-level", default="info")
    worker.set_defaults(func=cmd_worker)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key; the key alone is the last line")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name")
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="keys with their id, tenant, prefix and status")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser(
        "revoke", help="revoke a key by id; API processes refuse it within the auth cache TTL"
    )
    revoke.add_argument("key_id", help="the key's id, from `lorastack keys list`")
    revoke.set_defaults(func=cmd_keys_revoke)

    init = sub.add_parser(
        "init-model",
        help="write a randomly initialised SD 1.x pipeline (tiny, sd15) or text classifier "
        "(tiny-text)",
    )
    init.add_argument("--preset", choices=["tiny", "sd15", "tiny-text"], default="tiny")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("dir")
    init.set_defaults(func=cmd_init_model)

    plan = sub.add_parser(
        "plan", help="plan a training run: JSON request on stdin, the plan as JSON on stdout"
    )
    plan.add_argument(
        "--serve", action="store_true", help="answer one JSON request per line until EOF"
    )
    plan.set_defaults(func=cmd_plan)

    mig = sub.add_parser("migrate", help="alembic upgrade head on the configured database")
    mig.set_defaults(func=cmd_migrate)
