"""HTTP endpoints. Each model endpoint hands its work to the model worker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request

from service.api import operations, schemas
from service.api.serialization import OrjsonResponse
from service.runtime import ModelRuntime

RequestT = TypeVar("RequestT")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse, "description": description}
    for status, description in (
        (413, "Prompt or body over the configured limit"),
        (422, "Invalid request"),
        (401, "Missing or invalid API key, when the service requires one"),
        (500, "Internal error"),
        (503, "Model still loading, or the request queue is full; see Retry-After"),
        (507, "The request ran out of memory"),
    )
}

router = APIRouter()


class ModelNotReady(Exception):
    """The model is still loading."""


def runtime_of(request: Request) -> ModelRuntime:
    runtime: ModelRuntime | None = request.app.state.runtime
    if runtime is None:
        raise ModelNotReady()
    return runtime


async def run_model_work(
    request: Request, work: Callable[[ModelRuntime, RequestT], dict[str, Any]], body: RequestT
) -> OrjsonResponse:
    runtime = runtime_of(request)
    content = await request.app.state.worker.run(lambda: work(runtime, body), request.is_disconnected)
    return OrjsonResponse(content)


@router.post("/activation", response_model=schemas.ActivationResponse, responses=ERROR_RESPONSES)
async def post_activation(request: Request, body: schemas.ActivationRequest) -> OrjsonResponse:
    """Compute one node's activation, or a whole location's activations (optionally only the top k)."""
    return await run_model_work(request, operations.activation, body)


@router.post("/gradient", response_model=schemas.GradientResponse, responses=ERROR_RESPONSES)
async def post_gradient(request: Request, body: schemas.GradientRequest) -> OrjsonResponse:
    """Compute one node's gradient with respect to its residual stream, and direct effects of upstream nodes."""
    return await run_model_work(request, operations.gradient, body)


@router.post("/jvp", response_model=schemas.JvpResponse, responses=ERROR_RESPONSES)
async def post_jvp(request: Request, body: schemas.JvpRequest) -> OrjsonResponse:
    """Compute the first-order change of a whole downstream location along one write vector."""
    return await run_model_work(request, operations.jvp, body)


@router.post("/tokenize", response_model=schemas.TokenizeResponse, responses=ERROR_RESPONSES)
async def post_tokenize(request: Request, body: schemas.TokenizeRequest) -> OrjsonResponse:
    """Tokenize a prompt with the model's tokenizer."""
    runtime = runtime_of(request)
    # Tokenizing a large body takes a while, so it runs off the event loop but not on the model worker.
    return OrjsonResponse(await asyncio.to_thread(operations.tokenize_prompt, runtime, body))


@router.get("/model", response_model=schemas.ModelInfo, responses=ERROR_RESPONSES)
async def get_model(request: Request) -> OrjsonResponse:
    """Describe the loaded model, its autoencoders and the request limits."""
    return OrjsonResponse(runtime_of(request).info())


@router.get("/health", response_model=schemas.HealthResponse, responses={503: ERROR_RESPONSES[503]})
async def get_health(request: Request) -> OrjsonResponse:
    """Report whether the model is loaded and requests can be served."""
    runtime_of(request)
    return OrjsonResponse({"status": "ok"})
