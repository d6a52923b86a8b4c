"""API keys: `Authorization: Bearer <key>` against `--api-key` values, compared in constant time."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rerankd.api.errors import APIError, ErrorType
from rerankd.api.service import settings_of

bearer = HTTPBearer(auto_error=False, description="One of the server's `--api-key` values.")


def check_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    keys = settings_of(request).api_key
    if not keys:
        return
    offered = (credentials.credentials if credentials else "").encode()
    # Every key is compared (no early exit), each in constant time.
    matches = [hmac.compare_digest(offered, key.encode()) for key in keys]
    if not any(matches):
        message = "missing or invalid API key (send Authorization: Bearer <key>)"
        raise APIError(401, message, ErrorType.UNAUTHORIZED, "authorization")


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Route dependency: 401 unless the request carries an accepted key (no keys configured: open)."""
    check_api_key(request, credentials)
