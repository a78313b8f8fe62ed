"""Where the client finds its server and key: arguments, then the environment, then the file
that `lorastack login` writes (``$XDG_CONFIG_HOME/lorastack/config.json``, mode 0600)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorastack.client.errors import ConfigurationError

URL_ENV = "LORASTACK_URL"
API_KEY_ENV = "LORASTACK_API_KEY"


def config_path() -> Path:
    """The login file: ``$XDG_CONFIG_HOME/lorastack/config.json`` or ``~/.config/...``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lorastack" / "config.json"


@dataclass(frozen=True)
class Credentials:
    url: str
    api_key: str | None


def read_login() -> dict[str, str]:
    """The saved login, or an empty mapping when there is none (or it is unreadable)."""
    try:
        saved = json.loads(config_path().read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: str(v) for k, v in saved.items() if isinstance(v, str)}
        if isinstance(saved, dict)
        else {}
    )


def save_login(*, url: str, api_key: str) -> Path:
    """Store the URL and key for later commands, readable by the user alone."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"url": url, "api_key": api_key}, out)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def resolve(url: str | None, api_key: str | None) -> Credentials:
    """The server URL and key to use: arguments win, then the environment, then the login."""
    saved = read_login()
    found_url = url or os.environ.get(URL_ENV) or saved.get("url")
    if not found_url:
        raise ConfigurationError(
            f"no server URL: pass url=..., set {URL_ENV}, or run `lorastack login URL`"
        )
    key = api_key or os.environ.get(API_KEY_ENV) or saved.get("api_key")
    return Credentials(url=found_url.rstrip("/"), api_key=key or None)
