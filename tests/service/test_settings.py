"""Settings: URL forms, the embedded defaults, and one clear line for bad configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import Settings, SettingsError, normalize_database_url


def test_database_urls_pick_the_driver() -> None:
    assert normalize_database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_database_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(SettingsError, match="unsupported scheme 'mysql'"):
        normalize_database_url("mysql://u@h/db")


def test_defaults_are_embedded(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'lorastack.db'}"
    assert settings.embedded_redis
    assert settings.broker_url == f"redis+socket://{tmp_path / 'redis.sock'}"
    assert settings.default_base_model == "tiny"
    assert settings.model_sources == {"tiny": str(tmp_path / "models" / "tiny")}


def test_base_models_json_first_is_default() -> None:
    settings = Settings(base_models='{"sd15": "runwayml/stable-diffusion-v1-5", "mine": "/m"}')
    assert settings.default_base_model == "sd15"
    assert list(settings.model_sources) == ["sd15", "mine"]


def test_production_refuses_embedded_defaults(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="DATABASE_URL must be set in production"):
        Settings(env="production", data_dir=tmp_path).check()


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorastack.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LORASTACK_DATABASE_URL": "mysql://root@localhost/x"}, "unsupported scheme 'mysql'"),
        (
            {"LORASTACK_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
            "cannot reach the database",
        ),
        ({"LORASTACK_BASE_MODELS": "{not json"}, "LORASTACK_BASE_MODELS"),
        ({"LORASTACK_WORKER_HEARTBEAT_S": "soon"}, "LORASTACK_WORKER_HEARTBEAT_S"),
    ],
)
def test_bad_settings_fail_with_one_clear_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    result = run_cli(["migrate"], {"LORASTACK_DATA_DIR": str(tmp_path), **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lorastack: error:") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_batching_settings_and_their_bounds() -> None:
    from pydantic import ValidationError

    defaults = Settings()
    assert (defaults.generate_batch_max, defaults.generate_batch_wait_s) == (8, 0.0)
    assert defaults.inference_slot_count == 8
    # Any one request's adapters always fit the slots.
    assert Settings(inference_slots=2, generate_max_adapters=4).inference_slot_count == 4
    for bad in (
        {"generate_batch_wait_s": 11},
        {"generate_batch_wait_s": -1},
        {"generate_batch_max": 0},
        {"inference_slots": 0},
    ):
        with pytest.raises(ValidationError):
            Settings(**bad)
