"""The model worker: one thread that runs all model work, off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class ModelWorker:
    """Runs model work one job at a time on a dedicated thread.

    One thread is enough: torch already spreads one forward pass over the CPU cores or
    the GPU, and jobs in parallel would only compete for them.
    """

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-worker")

    async def run(self, function: Callable[[], T]) -> T:
        # The job runs in the caller's context, so its log lines carry the request id.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, function)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
