"""Finding adapters and versions: names, refs (``name``, ``name@3``, ``name@prod``)."""

from __future__ import annotations

import re
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import registry
from service.errors import NotFound, field_error
from service.models import Adapter, AdapterVersion
from service.registry import ADAPTER_NAME_PATTERN

_NAME_RE: Final = re.compile(ADAPTER_NAME_PATTERN)
_MAX_VERSION: Final = 2**31 - 1
_SELECTOR: Final = r"[a-z0-9._-]{1,100}"
_SELECTOR_RE: Final = re.compile(_SELECTOR)
_REF_RE: Final = re.compile(
    rf"(?P<name>{ADAPTER_NAME_PATTERN[1:-1]})(?:@(?P<selector>{_SELECTOR}))?"
)


def check_adapter_name(name: str, *, field: str = "name") -> None:
    """422 unless ``name`` is a valid adapter name (lowercase a-z 0-9 . _ -, 1-100 chars)."""
    if not _NAME_RE.fullmatch(name):
        raise field_error(
            field,
            f"invalid adapter name {name!r}: use 1-100 of a-z 0-9 . _ -, starting with a "
            "letter or digit",
            code="invalid_adapter_name",
        )


def get_adapter(session: Session, *, tenant_id: str, name: str) -> Adapter:
    """The tenant's adapter ``name``; 404 otherwise (another tenant's adapter included)."""
    adapter = session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    )
    if adapter is None:
        raise NotFound(f"adapter {name!r} not found", code="adapter_not_found")
    return adapter


def resolve_version(
    session: Session, *, adapter: Adapter, selector: str, field: str = "version"
) -> AdapterVersion:
    """The version a number (``3``) or an alias (``prod``, ``latest``) names; 404 if none."""
    if not _SELECTOR_RE.fullmatch(selector):
        raise field_error(
            field,
            f"{selector!r} is neither a version number nor an alias",
            code="invalid_version",
        )
    number = (
        int(selector)
        if selector.isdigit()
        else registry.alias_target(session, adapter_id=adapter.id, alias=selector)
    )
    if number is not None and number > _MAX_VERSION:
        number = None  # no such version; and too big for an SQL integer
    version = (
        None
        if number is None
        else session.scalar(
            select(AdapterVersion).where(
                AdapterVersion.adapter_id == adapter.id, AdapterVersion.version == number
            )
        )
    )
    if version is None:
        raise NotFound(
            f"adapter {adapter.name!r} has no version {selector!r}", code="version_not_found"
        )
    return version


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``name``, ``name@3`` or ``name@prod`` into (name, selector); 422 if malformed."""
    match = _REF_RE.fullmatch(ref)
    if match is None:
        raise field_error(
            "ref",
            f"invalid adapter ref {ref!r}: use 'name', 'name@<version>' or 'name@<alias>'",
            code="invalid_adapter_ref",
        )
    return match["name"], match["selector"] or registry.LATEST


def resolve_ref(session: Session, *, tenant_id: str, ref: str) -> tuple[Adapter, AdapterVersion]:
    """The adapter and version a ref names (``name`` alone means ``name@latest``).

    Raises 422 for a malformed ref and 404 (naming the ref) when nothing matches.
    """
    name, selector = parse_ref(ref)
    adapter = session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    )
    version = None
    if adapter is not None:
        try:
            version = resolve_version(session, adapter=adapter, selector=selector)
        except NotFound:
            version = None
    if adapter is None or version is None:
        raise NotFound(f"adapter ref {ref!r} matches no adapter version", code="adapter_not_found")
    return adapter, version


def get_version_by_id(session: Session, *, tenant_id: str, version_id: str) -> AdapterVersion:
    version = session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.id == version_id, AdapterVersion.tenant_id == tenant_id
        )
    )
    if version is None:
        raise NotFound(
            f"adapter version {version_id!r} (created by this Idempotency-Key) was deleted",
            code="version_not_found",
        )
    return version


def adapter_of(session: Session, version: AdapterVersion) -> Adapter:
    adapter = session.get(Adapter, version.adapter_id)
    assert adapter is not None
    return adapter
