"""Faults: out-of-memory errors, a full queue, disconnects, SIGTERM and authentication."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.worker import ClientDisconnected, ModelWorker, QueueFull
from service.core.nodes import MlpNeuronKind
from service.runtime import prepare
from service.settings import Settings
from tests.conftest import Checkpoint

TOKEN_IDS = [5, 80, 17, 250, 3]
NODE_REQUEST = {
    "token_ids": TOKEN_IDS,
    "trace_config": {"node": {"type": "mlp_neuron", "layer": 1, "token": 2, "neuron": 3}},
}
API_KEY = "test-key-5f1c"
READY_TIMEOUT_SECONDS = 60.0


def build_app(checkpoint: Checkpoint, **settings: Any) -> Any:
    options: dict[str, Any] = {"device": "cpu", "autoencoders": [], **settings}
    return create_app(Settings(**options), load=lambda s: prepare(s, checkpoint.loaded))


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        time.sleep(0.02)


@contextmanager
def serve(checkpoint: Checkpoint, **settings: Any) -> Iterator[TestClient]:
    with TestClient(build_app(checkpoint, **settings)) as client:
        wait_ready(client)
        yield client


class Gate:
    """Holds MLP activations at a gate until released, so a request stays on the worker."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        original = MlpNeuronKind.activations

        def gated(kind: Any, spec: Any, resid: Any, context: Any) -> Any:
            self.calls += 1
            self.entered.set()
            assert self.release.wait(30), "the gate was never released"
            return original(kind, spec, resid, context)

        monkeypatch.setattr(MlpNeuronKind, "activations", gated)


# --- out of memory ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB")],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_answers_507(
    tiny_llama: Checkpoint, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    with serve(tiny_llama) as client:
        original = MlpNeuronKind.activations

        def exhausted(*args: Any) -> Any:
            raise error

        monkeypatch.setattr(MlpNeuronKind, "activations", exhausted)
        response = client.post("/activation", json=NODE_REQUEST)
        assert response.status_code == 507
        assert "ran out of" in response.json()["detail"]
        assert "shorten the prompt" in response.json()["detail"]

        monkeypatch.setattr(MlpNeuronKind, "activations", original)
        assert client.post("/activation", json=NODE_REQUEST).status_code == 200
        assert client.get("/health").status_code == 200


def test_other_runtime_error_is_500(tiny_llama: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(tiny_llama) as client:

        def broken(*args: Any) -> Any:
            raise RuntimeError("shape mismatch in a bug")

        monkeypatch.setattr(MlpNeuronKind, "activations", broken)
        response = client.post("/activation", json=NODE_REQUEST)
        assert response.status_code == 500
        assert "shape mismatch" not in response.text
        assert "Traceback" not in response.text


# --- queue and disconnects --------------------------------------------------------------


def test_full_queue_answers_503(tiny_llama: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)

    async def scenario() -> list[httpx.Response]:
        app = build_app(tiny_llama, max_queue=1)
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                while (await client.get("/health")).status_code != 200:
                    await asyncio.sleep(0.02)
                running = asyncio.create_task(client.post("/activation", json=NODE_REQUEST))
                await asyncio.to_thread(gate.entered.wait, 10)
                queued = asyncio.create_task(client.post("/activation", json=NODE_REQUEST))
                await asyncio.sleep(0.1)
                rejected = [await client.post("/activation", json=NODE_REQUEST) for _ in range(3)]
                health = await client.get("/health")
                model = await client.get("/model")
                gate.release.set()
                return [await running, await queued, *rejected, health, model]

    running, queued, *rejected, health, model = asyncio.run(scenario())
    assert running.status_code == 200
    assert queued.status_code == 200
    for response in rejected:
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "1 requests are already queued" in response.json()["detail"]
    assert health.status_code == 200, "/health must answer while the worker is busy"
    assert model.status_code == 200


def test_worker_drops_disconnected_job() -> None:
    async def scenario() -> tuple[int, type[BaseException] | None]:
        worker = ModelWorker(max_queue=4)
        release = threading.Event()
        ran: list[str] = []

        async def gone() -> bool:
            return True

        blocker = asyncio.create_task(worker.run(lambda: release.wait(10)))
        await asyncio.sleep(0.05)
        dropped = asyncio.create_task(worker.run(lambda: ran.append("dropped job"), gone))
        await asyncio.sleep(0.2)
        release.set()
        await blocker
        error: type[BaseException] | None = None
        try:
            await dropped
        except ClientDisconnected as raised:
            error = type(raised)
        worker.shutdown()
        return len(ran), error

    ran, error = asyncio.run(scenario())
    assert ran == 0
    assert error is ClientDisconnected


def test_worker_rejects_beyond_queue() -> None:
    async def scenario() -> bool:
        worker = ModelWorker(max_queue=0)
        release = threading.Event()
        first = asyncio.create_task(worker.run(lambda: release.wait(10)))
        await asyncio.sleep(0.05)
        try:
            await worker.run(lambda: None)
            rejected = False
        except QueueFull:
            rejected = True
        release.set()
        await first
        worker.shutdown()
        return rejected

    assert asyncio.run(scenario())


def test_disconnect_while_queued_skips_request(tiny_llama: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    body = httpx.Request("POST", "http://127.0.0.1/activation", json=NODE_REQUEST).content

    async def scenario() -> list[dict[str, Any]]:
        app = build_app(tiny_llama)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
                while (await client.get("/health")).status_code != 200:
                    await asyncio.sleep(0.02)
                running = asyncio.create_task(client.post("/activation", json=NODE_REQUEST))
                await asyncio.to_thread(gate.entered.wait, 10)

                # A raw ASGI call whose client disconnects while its request waits behind the running one.
                disconnect = asyncio.Event()
                sent: list[dict[str, Any]] = []
                messages = [{"type": "http.request", "body": body, "more_body": False}]

                async def receive() -> dict[str, Any]:
                    if messages:
                        return messages.pop()
                    await disconnect.wait()
                    return {"type": "http.disconnect"}

                async def send(message: dict[str, Any]) -> None:
                    sent.append(message)

                scope = {
                    "type": "http",
                    "asgi": {"version": "3.0"},
                    "http_version": "1.1",
                    "method": "POST",
                    "path": "/activation",
                    "raw_path": b"/activation",
                    "query_string": b"",
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                    "client": ("127.0.0.1", 50000),
                    "server": ("127.0.0.1", 80),
                    "scheme": "http",
                }
                queued = asyncio.create_task(app(scope, receive, send))
                await asyncio.sleep(0.1)
                disconnect.set()
                await asyncio.sleep(0.2)
                gate.release.set()
                assert (await running).status_code == 200
                await queued
                return sent

    sent = asyncio.run(scenario())
    assert gate.calls == 1, "the disconnected request must not run"
    assert sent[0]["status"] == 499


# --- SIGTERM ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_server(base: str, process: subprocess.Popen[str] | None = None) -> None:
    """Poll a server on loopback until /health returns 200, failing if `process` exits first."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process is not None:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.05)


def test_shutdown_finishes_request_in_flight(tiny_llama: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    port = free_port()
    config = uvicorn.Config(build_app(tiny_llama), host="127.0.0.1", port=port, log_config=None)
    server = uvicorn.Server(config)
    # Signal handlers can only be installed on the main thread; the test calls the handler itself.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_for_server(base)

    results: list[httpx.Response] = []
    request = threading.Thread(target=lambda: results.append(httpx.post(f"{base}/activation", json=NODE_REQUEST, timeout=30)))
    request.start()
    assert gate.entered.wait(10)
    server.handle_exit(signal.SIGTERM, None)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/health", timeout=1)
    gate.release.set()
    request.join(30)
    thread.join(30)
    assert results and results[0].status_code == 200
    assert not thread.is_alive()


def test_sigterm_exits_cleanly(tiny_llama: Checkpoint) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--model", str(tiny_llama.directory), "--port", str(port), "--autoencoders"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_server(f"http://127.0.0.1:{port}", process)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "loaded model" in output


def test_bad_autoencoder_stops_start_up(tiny_llama: Checkpoint, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-autoencoder"
    result = subprocess.run(
        [sys.executable, "-m", "service", "--model", str(tiny_llama.directory), "--port", "0", "--autoencoders", f"ae={missing}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert str(missing) in result.stderr


# --- authentication ---------------------------------------------------------------------


def test_api_key_required(tiny_llama: Checkpoint, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with serve(tiny_llama, api_key=API_KEY) as client:
        assert client.get("/health").status_code == 200
        missing = client.get("/model")
        wrong = client.get("/model", headers={"Authorization": "Bearer not-the-key"})
        right = client.get("/model", headers={"Authorization": f"Bearer {API_KEY}"})
        posted = client.post("/activation", json=NODE_REQUEST, headers={"Authorization": f"Bearer {API_KEY}"})
        unauthorized_post = client.post("/activation", json=NODE_REQUEST)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "missing" in missing.json()["detail"]
    assert wrong.status_code == 401
    assert "invalid" in wrong.json()["detail"]
    assert right.status_code == 200
    assert posted.status_code == 200
    assert unauthorized_post.status_code == 401
    assert API_KEY not in caplog.text
    assert API_KEY not in repr(Settings(api_key=API_KEY, device="cpu"))


def test_api_key_off_by_default(tiny_llama: Checkpoint) -> None:
    with serve(tiny_llama) as client:
        assert client.get("/model").status_code == 200
        assert client.post("/activation", json=NODE_REQUEST).status_code == 200
