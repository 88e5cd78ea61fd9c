"""The FastAPI application: lifespan loading, middleware, routes and error handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from service.api.errors import error_response, install_error_handlers
from service.api.middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    RequestIdMiddleware,
    UnexpectedErrorMiddleware,
)
from service.api.routes import ModelNotReady, router
from service.api.serialization import OrjsonResponse
from service.api.worker import ModelWorker
from service.runtime import ModelRuntime, load_runtime
from service.settings import LOCALHOST_ORIGIN_REGEX, Settings

logger = logging.getLogger(__name__)

RuntimeLoader = Callable[[Settings], ModelRuntime]
LOADING_RETRY_AFTER_SECONDS = "10"


def create_app(
    settings: Settings,
    load: RuntimeLoader = load_runtime,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app. The model loads in the background at start-up, and until then model routes return 503."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = None
        app.state.worker = ModelWorker(settings.max_queue)
        loading = asyncio.create_task(_load(app))
        try:
            yield
        finally:
            loading.cancel()
            app.state.worker.shutdown()

    async def _load(app: FastAPI) -> None:
        try:
            app.state.runtime = await asyncio.to_thread(load, settings)
        except Exception as error:
            logger.error("loading the model failed: %s", error)
            app.state.load_error = error
            if on_load_failure is not None:
                on_load_failure(error)

    app = FastAPI(
        title="Attribution service",
        version="0.1.0",
        summary="Activations, gradients and Jacobian-vector products of the units of a transformer language model.",
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
    )
    app.state.settings = settings
    app.state.runtime = None
    install_error_handlers(app)

    async def handle_not_ready(request: Request, error: Exception) -> OrjsonResponse:
        return error_response(
            503, "the model is still loading; retry shortly", headers={"Retry-After": LOADING_RETRY_AFTER_SECONDS}
        )

    app.add_exception_handler(ModelNotReady, handle_not_ready)
    app.include_router(router)

    # Middleware added last runs first: request ids wrap everything, so even 413s and 500s carry one.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        # Added inside CORS, because CORS must handle preflight requests, which carry no credentials.
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_origin_regex=None if settings.cors_origins else LOCALHOST_ORIGIN_REGEX,
        allow_methods=["GET", "POST"],
        allow_headers=["Content-Type", "Authorization", "X-Request-ID"],
        expose_headers=["X-Request-ID", "Retry-After"],
    )
    app.add_middleware(RequestIdMiddleware)
    return app
