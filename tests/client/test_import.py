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
