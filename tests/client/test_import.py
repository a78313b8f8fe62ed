"""`import lorastack` is light: httpx and pydantic, no torch and no server code."""

from __future__ import annotations

import json
import subprocess
import sys


def test_import_lorastack_loads_no_torch_and_no_server_code() -> None:
    script = (
        "import json, sys\n"
        "import lorastack\n"
        "from lorastack import AsyncClient, Client\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(result.stdout))
    assert {"httpx", "pydantic", "lorastack"} <= loaded
    heavy = {"torch", "diffusers", "peft", "fastapi", "sqlalchemy", "celery", "service", "workers"}
    assert loaded & heavy == set()


def test_client_package_imports_no_server_engine_or_web_code() -> None:
    """Read from the source, lazy imports included: the client is HTTP + pydantic only."""
    from tests.test_layers import GRAPH

    forbidden = {"service", "workers", "lorafile", "torch", "fastapi", "sqlalchemy", "celery"}
    for module, imports in GRAPH.items():
        if module == "lorastack.client" or module.startswith("lorastack.client."):
            bad = {i for i in imports if i.split(".")[0] in forbidden | {"rich"}}
            assert not bad, f"{module} imports {sorted(bad)}"
