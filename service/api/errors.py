"""One error shape for every error response: {"detail": str, "errors": [...]}."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.serialization import NonFiniteResultError, OrjsonResponse
from service.api.validation import InvalidRequest

logger = logging.getLogger(__name__)


def error_response(
    status_code: int, detail: str, errors: Sequence[dict[str, Any]] = (), headers: dict[str, str] | None = None
) -> OrjsonResponse:
    return OrjsonResponse({"detail": detail, "errors": list(errors)}, status_code=status_code, headers=headers)


def _loc_text(loc: Sequence[str | int]) -> str:
    parts = [str(part) for part in loc if part != "body"]
    return ".".join(parts) or "body"


def _clean_message(message: str) -> str:
    return message.removeprefix("Value error, ")


def _validation_items(error: RequestValidationError) -> list[dict[str, Any]]:
    items = []
    for item in error.errors():
        # Tagged-union errors repeat the tag in loc; keep the path a client can follow.
        loc = [part for part in item.get("loc", ()) if isinstance(part, (str, int))]
        items.append({"loc": loc, "msg": _clean_message(str(item.get("msg", ""))), "type": str(item.get("type", ""))})
    return items


async def handle_validation_error(request: Request, error: Exception) -> OrjsonResponse:
    assert isinstance(error, RequestValidationError)
    items = _validation_items(error)
    detail = "; ".join(f"{_loc_text(item['loc'])}: {item['msg']}" for item in items) or "invalid request"
    return error_response(422, detail, items)


async def handle_invalid_request(request: Request, error: Exception) -> OrjsonResponse:
    assert isinstance(error, InvalidRequest)
    item = {"loc": list(error.loc), "msg": error.message, "type": "value_error"}
    return error_response(error.status_code, f"{_loc_text(error.loc)}: {error.message}", [item])


async def handle_http_error(request: Request, error: Exception) -> OrjsonResponse:
    assert isinstance(error, StarletteHTTPException)
    return error_response(error.status_code, str(error.detail), headers=dict(error.headers or {}))


async def handle_non_finite(request: Request, error: Exception) -> OrjsonResponse:
    logger.error("request %s produced a non-finite result: %s", request_id_of(request), error)
    return error_response(500, f"{error}; the result was not sent because it would not be valid")


async def handle_unexpected(request: Request, error: Exception) -> OrjsonResponse:
    logger.exception("request %s failed with an unexpected error", request_id_of(request))
    return error_response(500, f"internal error; quote request id {request_id_of(request)} when reporting it")


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(InvalidRequest, handle_invalid_request)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(NonFiniteResultError, handle_non_finite)
    app.add_exception_handler(Exception, handle_unexpected)
