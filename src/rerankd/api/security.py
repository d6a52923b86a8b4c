"""API keys: `Authorization: Bearer <key>` against `--api-key` values, compared as bytes in constant time.

A header reaches Starlette decoded as latin-1, so its raw bytes are `credentials.encode("latin-1")`; a key is
matched by its UTF-8 bytes, which is how a client sends a non-ASCII key. Settings refuse empty keys and keys
with surrounding whitespace at start (`rerankd.settings`), so neither can reach this comparison.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rerankd.api.errors import APIError, ErrorType
from rerankd.api.service import settings_of

bearer = HTTPBearer(auto_error=False, description="One of the server's `--api-key` values.")


def _refused() -> APIError:
    message = "missing or invalid API key (send Authorization: Bearer <key>)"
    return APIError(401, message, ErrorType.UNAUTHORIZED, "authorization")


def check_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    """401 unless the request's bearer token is one of the keys (no keys configured: every request passes)."""
    keys = settings_of(request).api_key
    if not keys:
        return
    if credentials is None:
        raise _refused()
    offered = credentials.credentials.encode("latin-1")
    # Every key is compared (no early exit), each in constant time.
    matches = [hmac.compare_digest(offered, key.encode()) for key in keys]
    if not any(matches):
        raise _refused()


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Route dependency: 401 unless the request carries an accepted key (no keys configured: open)."""
    check_api_key(request, credentials)
