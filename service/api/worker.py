"""The model worker: one thread that runs all model work, behind a bounded queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import torch

T = TypeVar("T")

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.05


class QueueFull(Exception):
    """The worker already has its maximum number of requests waiting."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} requests are already waiting")
        self.limit = limit


class ClientDisconnected(Exception):
    """The client went away before its request ran, so the request was dropped."""


class OutOfMemory(Exception):
    """A request ran out of memory; what it held has been released."""

    def __init__(self, device: str) -> None:
        super().__init__(f"out of {device} memory")
        self.device = device


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    # The CPU allocator reports failure as a RuntimeError.
    return isinstance(error, RuntimeError) and "not enough memory" in str(error)


class ModelWorker:
    """Runs model work one job at a time on a dedicated thread.

    One thread is enough: torch already spreads one forward pass over the CPU cores or
    the GPU, and jobs in parallel would only compete for them. At most `max_queue` jobs
    wait behind the running one. More are rejected with `QueueFull`, so that a burst of
    requests gets a prompt 503 instead of an ever longer wait.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-worker")
        self._jobs = 0  # queued plus running, counted on the event loop thread

    @property
    def jobs(self) -> int:
        return self._jobs

    async def run(self, function: Callable[[], T], is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> T:
        """Run `function` on the worker thread and return its result.

        Raises QueueFull when the queue is full, ClientDisconnected when the client goes
        away before the job starts, and OutOfMemory when the job runs out of memory.
        """
        if self._jobs > self.max_queue:
            raise QueueFull(self.max_queue)
        dropped = False
        context = contextvars.copy_context()

        def job() -> T:
            if dropped:
                raise ClientDisconnected()
            try:
                return context.run(function)
            except Exception as error:
                if not _is_out_of_memory(error):
                    raise
                device = "GPU" if isinstance(error, torch.cuda.OutOfMemoryError) else "CPU"
            # Out of the except block, the traceback and the tensors its frames held are gone.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise OutOfMemory(device)

        future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        self._jobs += 1
        future.add_done_callback(self._job_done)
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return future.result()
            if not dropped and is_disconnected is not None and await is_disconnected():
                # A job that already started runs to its end; one still queued is skipped.
                dropped = True

    def _job_done(self, future: asyncio.Future[T]) -> None:
        self._jobs -= 1
        if not future.cancelled() and isinstance(future.exception(), ClientDisconnected):
            logger.info("dropped a request whose client disconnected while it was queued")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
