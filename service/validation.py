"""Hostile JSON and validation errors: every bad body is a 422 that names the field, never a 500.

Python's `json` module takes what JSON forbids or what this API cannot store: `NaN` and `Infinity`, numbers
such as `1e400` that overflow to infinity, integers past 64 bits (the Qdrant engines store i64), and
lone UTF-16 surrogates (`"\\ud800"`), which no UTF-8 response or log can encode. `StrictJsonRoute` parses
request bodies with those refused, naming where they are (`body.filters.where.0.any.0: ...`).

FastAPI's own validation handler echoes each bad input back (`input`, `ctx`), and fails itself when that input
cannot be encoded; `validation_failed` answers with the location and message only, made printable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from schemas.text import printable

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Refused:
    """What a parse hook returns for a value the API refuses; the walk reports it with its place."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _constant(name: str) -> _Refused:
    return _Refused(f"{name} is not a finite number")


def _float(text: str) -> float | _Refused:
    value = float(text)
    return value if math.isfinite(value) else _Refused(f"{text[:40]} is not a finite number")


def _int(text: str) -> int | _Refused:
    digits = text.lstrip("-")
    if len(digits) > 19:  # also spares int() the work of a 10,000-digit number
        return _Refused("the integer is outside the 64-bit range")
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else _Refused("the integer is outside the 64-bit range")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _problem(value: Any, where: list[str]) -> str | None:
    """The first refused value under `value`, as 'body.a.0.b: reason', or None."""
    stack: list[tuple[Any, list[str]]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _Refused):
            return f"{'.'.join(path)}: {item.reason}"
        if isinstance(item, str):
            if not _encodable(item):
                return f"{'.'.join(path)}: the text holds a lone UTF-16 surrogate (not a character)"
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if not _encodable(key):
                    return f"{'.'.join(path)}: a key holds a lone UTF-16 surrogate (not a character)"
                stack.append((child, [*path, printable(key, limit=64)]))
        elif isinstance(item, list):
            stack.extend((child, [*path, str(i)]) for i, child in reversed(list(enumerate(item))))
    return None


def strict_loads(body: bytes | str) -> Any:
    """JSON with non-finite numbers, integers past 64 bits and lone surrogates refused (HTTPException 422);
    malformed JSON raises json.JSONDecodeError as `json.loads` does."""
    value = json.loads(body, parse_constant=_constant, parse_float=_float, parse_int=_int)
    problem = _problem(value, ["body"])
    if problem is not None:
        raise HTTPException(422, problem)
    return value


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """An APIRoute whose handler reads JSON bodies with `strict_loads`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler


def validation_failed(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with each error's location, type and message, the client's input left out (it may be anything)."""
    detail = [
        {
            "type": str(error.get("type", "value_error")),
            "loc": [part if isinstance(part, int) else printable(str(part), limit=64) for part in error.get("loc", ())],
            "msg": printable(str(error.get("msg", "invalid value")), limit=500),
        }
        for error in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"detail": detail})
