"""The Alembic migrations build exactly the schema the models describe, on both backends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.db import Base, make_engine
from tests.conftest import create_postgres_database, drop_postgres_database, migrate_url

TEST_DB_URL = os.environ.get("LORASTACK_TEST_DATABASE_URL")


def assert_models_match_migrations(url: str) -> None:
    migrate_url(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"
    assert set(Base.metadata.tables) <= tables


def test_sqlite_migrations_match_models(tmp_path: Path) -> None:
    assert_models_match_migrations(f"sqlite:///{tmp_path / 'fresh.db'}")


@pytest.mark.skipif(not TEST_DB_URL, reason="LORASTACK_TEST_DATABASE_URL not set")
def test_postgres_migrations_match_models() -> None:
    assert TEST_DB_URL
    url = create_postgres_database(TEST_DB_URL)
    try:
        assert_models_match_migrations(url)
    finally:
        drop_postgres_database(url)


def test_alembic_cli_migrates_the_configured_database(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "LORASTACK_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    alembic = Path(sys.executable).parent / "alembic"
    subprocess.run(
        [str(alembic), "upgrade", "head"], cwd=repo, env=env, check=True, capture_output=True
    )
    check = subprocess.run(
        [str(alembic), "check"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
