"""API keys for the embedding service, checked the way OpenAI-compatible servers do (``Authorization:
Bearer <key>``), without the keys ever travelling in the clear.

``rime serve --api-key`` / ``RIME_API_KEY`` are hashed in the driver, and only the SHA-256 digests go
into the replicas' constructor arguments: Ray Serve shows those arguments in its dashboard and status
output, and MLflow or logs may record a config. A replica deployed with ``serve deploy`` can instead
read ``RIME_API_KEY`` from its own environment (``runtime_env.env_vars``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable

ENV_VAR = "RIME_API_KEY"


def key_digest(key: str) -> str:
    """Hex SHA-256 of one key: what a Serve config may carry (``api_key_sha256``)."""
    return hashlib.sha256(key.encode()).hexdigest()


def split_keys(value: str | None) -> list[str]:
    """Several keys in one variable, comma-separated (key rotation: old and new both valid for a while)."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


class KeyCheck:
    """The set of accepted key digests; empty = the service is open (the default, as for TEI)."""

    def __init__(self, digests: Iterable[str] = (), keys: Iterable[str] = ()):
        self.digests = {d.lower() for d in digests} | {key_digest(k) for k in keys}

    @classmethod
    def from_args_and_env(cls, digests: Iterable[str] | None) -> KeyCheck:
        return cls(digests or (), split_keys(os.environ.get(ENV_VAR)))

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries an accepted key (constant-time comparison)."""
        if not self.required:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = key_digest(token.strip())
        return any(hmac.compare_digest(digest, d) for d in self.digests)


def unauthorized_body(header_present: bool) -> dict:
    """OpenAI's 401 body (its clients raise ``AuthenticationError`` on it)."""
    why = "the API key is not valid" if header_present else "no API key given"
    return {
        "error": {
            "message": f"{why}: send 'Authorization: Bearer <key>' with a key this service was started with "
            f"(rime serve --api-key or {ENV_VAR})",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
