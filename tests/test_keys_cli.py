"""`lorastack keys create|list|revoke` on the stack's database, and what a revoked key gets."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time

from fastapi.testclient import TestClient

from service.app import create_app
from tests.conftest import Stack, wait_for


def keys(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorastack.cli", "keys", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def test_a_revoked_key_stops_working_within_the_cache_ttl(stack: Stack) -> None:
    tenant = f"cli-{secrets.token_hex(3)}"
    secret = keys(stack, "create", "--tenant", tenant, "--name", "laptop").stdout.split()[-1]
    listed = keys(stack, "list", "--tenant", tenant).stdout.splitlines()
    assert listed[0].split()[:3] == ["id", "tenant", "key"]
    assert len(listed) == 2 and tenant in listed[1] and "active" in listed[1]
    assert secret[:8] + "..." in listed[1] and secret not in listed[1]
    key_id = listed[1].split()[0]
    other = f"cli-{secrets.token_hex(3)}"
    keys(stack, "create", "--tenant", other)
    assert other not in keys(stack, "list", "--tenant", tenant).stdout
    assert other in keys(stack, "list").stdout

    ttl = 1.0
    headers = {"Authorization": f"Bearer {secret}"}
    with TestClient(create_app(stack.settings.model_copy(update={"auth_cache_ttl_s": ttl}))) as c:
        assert c.get("/jobs", headers=headers).status_code == 200  # verified, now cached
        revoked = keys(stack, "revoke", key_id)
        revoked_at = time.monotonic()
        wait_for(
            lambda: c.get("/jobs", headers=headers).status_code == 401,
            timeout=ttl + 5,
            what="the revoked key to be refused",
        )
        assert time.monotonic() - revoked_at <= ttl + 1.0
    assert key_id in revoked.stdout and "LORASTACK_AUTH_CACHE_TTL_S (10 s)" in revoked.stdout
    assert "revoked" in keys(stack, "list", "--tenant", tenant).stdout.splitlines()[1]
    # A fresh process never accepts it.
    with TestClient(create_app(stack.settings)) as fresh:
        assert fresh.get("/jobs", headers=headers).status_code == 401

    unknown = keys(stack, "revoke", "key_nope", check=False)
    assert unknown.returncode == 2 and "no API key 'key_nope'" in unknown.stderr
