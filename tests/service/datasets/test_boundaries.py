"""The ingest code runs in the API process: it must not pull in the training stack."""

from __future__ import annotations

import subprocess
import sys


def test_dataset_modules_do_not_import_the_torch_stack() -> None:
    code = (
        "import sys, service.datasets.ingest, service.datasets.images;"
        "heavy = {'torch', 'diffusers', 'transformers', 'peft'} & set(sys.modules);"
        "print(sorted(heavy)); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
