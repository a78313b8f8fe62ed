"""The import direction of docs/architecture.md, read from the source (every import, lazy ones
included): lorafile <- engine <- workers; lorafile <- service kernel <- service domains <- app;
lorastack.cli on top of both sides."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("lorafile", "service", "workers", "lorastack")
# Service domains, lowest first: a domain may import the kernel and the domains before it.
DOMAINS = ("datasets", "jobs", "adapters", "generation", "experiments", "health")
SERVICE_APP = {"service.app", "service.openapi"}
# Kernel modules that speak HTTP: the domains use them, processes without HTTP must not.
SERVICE_HTTP = {"service.deps", "service.problems", "service.body_limit", "service.strict_input"}
WEB_AND_SQL = {"fastapi", "starlette", "sqlalchemy", "celery", "kombu", "redis", "alembic"}
TORCH_SIDE = {"torch", "diffusers", "transformers", "peft", "accelerate"}
LORAFILE_ALLOWED_THIRD_PARTY = {"numpy", "safetensors"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names (lazy imports inside functions too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = _module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # `from service import lifecycle` imports the module service.lifecycle.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for top in PRODUCT:
        for path in sorted((REPO / top).rglob("*.py")):
            graph[_module_name(path)] = _imports(path)
    return graph


GRAPH = _graph()


def _top(name: str) -> str:
    return name.split(".")[0]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _domain(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "service" and parts[1] in DOMAINS else None


def _is_kernel(name: str) -> bool:
    return _top(name) == "service" and _domain(name) is None and name not in SERVICE_APP


def _violations(allowed: dict[str, object]) -> list[str]:
    return [f"{src} imports {dst}" for src, dst in allowed.items()]


def test_lorafile_is_pure() -> None:
    bad = {
        (m, i)
        for m, imports in GRAPH.items()
        if _top(m) == "lorafile"
        for i in imports
        if _top(i)
        in {*PRODUCT, *WEB_AND_SQL, *TORCH_SIDE, "pydantic", "pydantic_settings"} - {"lorafile"}
    }
    assert not bad, sorted(bad)


def test_engine_imports_only_the_lorafile_kernel() -> None:
    bad = {
        (m, i)
        for m, imports in GRAPH.items()
        if _under(m, "workers.engine")
        for i in imports
        if (_top(i) in {"service", "lorastack", *WEB_AND_SQL})
        or (_top(i) == "workers" and not _under(i, "workers.engine"))
    }
    assert not bad, sorted(bad)


def test_workers_use_the_service_kernel_only() -> None:
    bad = {
        (m, i)
        for m, imports in GRAPH.items()
        if _top(m) == "workers"
        for i in imports
        if _top(i) == "lorastack"
        or (_top(i) == "service" and i != "service" and (not _is_kernel(i) or i in SERVICE_HTTP))
        or _top(i) in {"fastapi", "starlette"}
    }
    assert not bad, sorted(bad)


def test_service_never_imports_workers_or_the_cli() -> None:
    bad = {
        (m, i)
        for m, imports in GRAPH.items()
        if _top(m) == "service"
        for i in imports
        if _top(i) in {"workers", "lorastack", *TORCH_SIDE}
    }
    assert not bad, sorted(bad)


def test_service_kernel_never_imports_a_domain_or_the_app() -> None:
    bad = {
        (m, i)
        for m, imports in GRAPH.items()
        if _is_kernel(m)
        for i in imports
        if _top(i) == "service" and (_domain(i) is not None or i in SERVICE_APP)
    }
    assert not bad, sorted(bad)


def test_domains_import_only_lower_domains() -> None:
    bad = set()
    for m, imports in GRAPH.items():
        own = _domain(m)
        if own is None:
            continue
        for i in imports:
            other = _domain(i)
            if i in SERVICE_APP or (
                other is not None and DOMAINS.index(other) > DOMAINS.index(own)
            ):
                bad.add((m, i))
    assert not bad, sorted(bad)


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("workers.training", {"fastapi", "starlette"}),
        ("workers.generation", {"fastapi", "starlette"}),
        ("workers.tasks", {"fastapi", "starlette"}),
        ("service.app", TORCH_SIDE),
        ("lorafile", {"torch", "fastapi", "sqlalchemy", "pydantic_settings"}),
    ],
)
def test_importing_a_module_loads_nothing_forbidden(module: str, forbidden: set[str]) -> None:
    """What the source says, checked again in a fresh interpreter (third-party imports too)."""
    code = (
        f"import sys, {module}; "
        f"print(','.join(sorted(m for m in {sorted(forbidden)!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.strip()
    assert out == "", f"importing {module} loads {out}"
