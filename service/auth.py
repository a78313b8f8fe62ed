"""API keys: random secrets stored as sha256 hashes, each belonging to a tenant."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import ApiKey, Tenant

KEY_PREFIX = "lsk_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant every query is scoped to, and the key used."""

    tenant_id: str
    key_id: str


def hash_key(secret: str) -> str:
    # Keys are 256-bit random secrets, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(secret.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, *, tenant_name: str, name: str | None = None) -> str:
    """Create a key for ``tenant_name`` (creating the tenant if needed); returns the secret."""
    tenant = get_or_create_tenant(session, tenant_name)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(tenant_id=tenant.id, key_hash=hash_key(secret), prefix=secret[:8], name=name)
    )
    session.flush()
    return secret


def list_api_keys(session: Session, *, tenant_name: str | None = None) -> list[ApiKey]:
    """Keys (revoked ones too), oldest first; only ``tenant_name``'s when given."""
    query = select(ApiKey).join(Tenant).order_by(ApiKey.created_at, ApiKey.id)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return list(session.scalars(query).all())


def revoke_api_key(session: Session, key_id: str) -> ApiKey | None:
    """Mark a key revoked (flushed); None when no key has that id.

    Lookups refuse it at once; an API process that verified it within the last
    ``auth_cache_ttl_s`` seconds keeps accepting it until its cache entry expires.
    """
    key = session.get(ApiKey, key_id)
    if key is None:
        return None
    key.revoked = True
    session.flush()
    return key


def authenticate(session: Session, secret: str) -> Principal | None:
    return lookup_key(session, hash_key(secret))


def lookup_key(session: Session, key_hash: str) -> Principal | None:
    key = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked.is_(False))
    )
    if key is None:
        return None
    return Principal(tenant_id=key.tenant_id, key_id=key.id)


class KeyCache:
    """Recently verified keys (by hash) for ``ttl_s`` seconds, so most requests skip the lookup.

    Only keys that verified are kept: an unknown key is looked up every time. A key revoked in
    SQL is refused by every API process within ``ttl_s``. Used from the event loop only.
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        expires, principal = entry
        if time.monotonic() >= expires:
            del self._entries[key_hash]
            return None
        return principal

    def put(self, key_hash: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        self._entries[key_hash] = (time.monotonic() + self.ttl_s, principal)
        self._entries.move_to_end(key_hash)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
