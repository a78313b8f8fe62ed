"""The lorastack API client (sync and async), its typed models and errors."""

from lorastack.client.aio import AsyncClient
from lorastack.client.client import Client
from lorastack.client.errors import (
    APIError,
    AuthenticationError,
    BadRequest,
    ConfigurationError,
    Conflict,
    ConnectionFailed,
    FieldError,
    JobFailed,
    LorastackError,
    NotFound,
    RateLimited,
    ServerError,
    ValidationFailed,
)
from lorastack.client.follow import Progress, WaitTimeout
from lorastack.client.images import GenerationResult, Image
from lorastack.client.transfer import Downloaded

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
