"""``python -m lorastack.cli``: how the service starts its own child processes."""

from lorastack.cli import main

main()
