"""lorastack: train LoRA adapters and serve them over HTTP.

``from lorastack import Client`` is the Python client of the HTTP API; importing it loads httpx
and pydantic only (no torch, no server code). The names are those of ``lorastack.client``.
"""

from lorastack import client as _client
from lorastack.client import *  # noqa: F403  (the client's public names, listed once there)

__all__ = _client.__all__
