"""The optional API key of write and admin endpoints (`API_KEY`, sent as the `X-API-Key` header).

Without `API_KEY` every endpoint is open (a service on loopback or behind a gateway that authenticates).
With it, the endpoints that change data or start work (`POST /catalogues/{c}/match-jobs`,
`POST /catalogues/{c}/ingest`, `POST` / `DELETE` of labels, `POST /catalogues/{c}/train`) answer 401 without
the header and 403 with a wrong key; reads stay open.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Security
from fastapi.security import APIKeyHeader

from schemas.search import ErrorResponse
from service.deps import StateDep

API_KEY_HEADER = "X-API-Key"
_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    scheme_name="ApiKey",
    description="the service's API_KEY; needed by write and admin endpoints when API_KEY is set",
)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def key_matches(given: str, expected: str) -> bool:
    """Constant time in the keys' contents and lengths: both sides are hashed to 32 bytes, then compared."""
    return hmac.compare_digest(_digest(given), _digest(expected))


def require_api_key(state: StateDep, given: Annotated[str | None, Security(_scheme)]) -> None:
    expected = state.settings.api_key
    if expected is None:
        return
    if not given:
        raise HTTPException(
            401,
            f"this endpoint needs the API key in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": "ApiKey"},
        )
    if not key_matches(given, expected.get_secret_value()):
        raise HTTPException(403, "the API key is not valid")


# For a route's `dependencies=[...]`: the key is checked before the handler runs (and before a JSON body
# is validated; a body that is not JSON at all is refused first).
API_KEY = Depends(require_api_key)
WRITE_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorResponse, "description": "API_KEY is set and the request has no X-API-Key header"},
    403: {"model": ErrorResponse, "description": "the X-API-Key header does not hold the API key"},
}
