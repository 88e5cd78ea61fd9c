"""One error shape for every error response: {"detail": str, "errors": [...]}."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas import UNION_TAGS
from service.api.serialization import NonFiniteResultError, OrjsonResponse
from service.api.validation import InvalidRequest
from service.api.worker import ClientDisconnected, OutOfMemory, QueueFull

QUEUE_RETRY_AFTER_SECONDS = "1"

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


def _input_text(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field_path(loc: Sequence[Any], body: Any) -> list[str | int]:
    """Return pydantic's loc without the parts that name a union member rather than a field."""
    path: list[str | int] = []
    current = body
    for position, part in enumerate(loc):
        is_last = position == len(loc) - 1
        is_key = isinstance(current, dict) and part in current
        if isinstance(part, str) and part in UNION_TAGS and not is_last and not is_key:
            continue
        path.append(part)
        if position == 0 and part == "body":
            continue
        if is_key:
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            current = current[part]
        else:
            current = None
    return path


def _message(item: dict[str, Any]) -> str:
    message = _clean_message(str(item.get("msg", "")))
    kind = str(item.get("type", ""))
    if kind == "json_invalid":
        reason = item.get("ctx", {}).get("error", "")
        position = item.get("loc", ("body", "?"))[-1]
        return f"invalid JSON at character {position}: {reason}"
    if kind not in ("missing", "extra_forbidden", "value_error", "model_type") and "input" in item:
        message = f"{message}, got {_input_text(item['input'])}"
    elif kind == "extra_forbidden":
        message = f"{message}: remove it"
    return message


def _validation_items(error: RequestValidationError) -> list[dict[str, Any]]:
    items = []
    body = error.body
    for item in error.errors():
        if item.get("type") == "json_invalid":
            loc: list[str | int] = ["body"]
        else:
            loc = _field_path(item.get("loc", ()), body)
        items.append({"loc": loc, "msg": _message(dict(item)), "type": str(item.get("type", ""))})
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
    if error.status_code == 400:
        # FastAPI raises a bare 400 for a body it cannot decode, such as bytes that are not UTF-8.
        # It is an invalid request body like malformed JSON, so it gets the same 422.
        cause = error.__cause__
        reason = f": {cause}" if cause is not None else ""
        message = f"the body could not be decoded as JSON{reason}"
        return error_response(422, f"body: {message}", [{"loc": ["body"], "msg": message, "type": "json_invalid"}])
    return error_response(error.status_code, str(error.detail), headers=dict(error.headers or {}))


async def handle_non_finite(request: Request, error: Exception) -> OrjsonResponse:
    logger.error("request %s produced a non-finite result: %s", request_id_of(request), error)
    return error_response(500, f"{error}; the result was not sent because it would not be valid")


class RateLimitedCount:
    """Counts repeated events and logs them at most once per interval, with the count."""

    def __init__(self, interval_seconds: float) -> None:
        self.interval_seconds = interval_seconds
        self.count = 0
        self.last_logged = float("-inf")

    def add(self, message: str, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last_logged >= self.interval_seconds:
            logger.warning(message + " (%d such rejections since the last line)", *args, self.count)
            self.count = 0
            self.last_logged = now


queue_full_rejections = RateLimitedCount(interval_seconds=10.0)


async def handle_queue_full(request: Request, error: Exception) -> OrjsonResponse:
    assert isinstance(error, QueueFull)
    queue_full_rejections.add("rejected a request because %d requests are already queued", error.limit)
    return error_response(
        503,
        f"the service is busy: {error.limit} requests are already queued; retry after {QUEUE_RETRY_AFTER_SECONDS} s",
        headers={"Retry-After": QUEUE_RETRY_AFTER_SECONDS},
    )


async def handle_disconnected(request: Request, error: Exception) -> OrjsonResponse:
    # The client has gone, so this response is never read. Proxies log 499 for such a request.
    return error_response(499, "the client disconnected before the request ran")


async def handle_out_of_memory(request: Request, error: Exception) -> OrjsonResponse:
    assert isinstance(error, OutOfMemory)
    logger.error("request %s ran out of %s memory; its tensors were released", request_id_of(request), error.device)
    return error_response(
        507,
        f"the request ran out of {error.device} memory; shorten the prompt, ask for a smaller location "
        "(one token or top_k) or fewer upstream_nodes, and try again",
    )


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(InvalidRequest, handle_invalid_request)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(NonFiniteResultError, handle_non_finite)
    app.add_exception_handler(QueueFull, handle_queue_full)
    app.add_exception_handler(ClientDisconnected, handle_disconnected)
    app.add_exception_handler(OutOfMemory, handle_out_of_memory)
