"""lorastack: train LoRA adapters and serve them over HTTP.

``from lorastack import Client`` is the Python client of the HTTP API; importing it loads httpx
and pydantic only (no torch, no server code).
"""

from lorastack.client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    BadRequest,
    Client,
    ConfigurationError,
    Conflict,
    ConnectionFailed,
    Downloaded,
    FieldError,
    GenerationResult,
    Image,
    JobFailed,
    LorastackError,
    NotFound,
    Progress,
    RateLimited,
    ServerError,
    ValidationFailed,
    WaitTimeout,
)

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "Client",
    "ConfigurationError",
    "Conflict",
    "ConnectionFailed",
    "Downloaded",
    "FieldError",
    "GenerationResult",
    "Image",
    "JobFailed",
    "LorastackError",
    "NotFound",
    "Progress",
    "RateLimited",
    "ServerError",
    "ValidationFailed",
    "WaitTimeout",
]
