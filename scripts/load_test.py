"""Load-test the attribution service: start it, send concurrent requests, check that it holds up.

Usage, from the repository root:

    .venv/bin/python scripts/load_test.py --requests 3000 --duration 1800
    .venv/bin/python scripts/load_test.py --duration 60 --max-queue 2   # exercise the 503 path
    .venv/bin/python scripts/load_test.py --model PATH -- --max-tokens 256

The script starts `python -m service` on 127.0.0.1 with a free port (arguments after
`--` go to the service unchanged) and waits for /health to return 200. It then sends
warm-up requests until --warmup-requests of them returned 200, reads the service's
resident memory, and runs --clients concurrent clients until --requests requests were
sent or --duration seconds passed, whichever comes first. The clients mix /activation (one node, and a whole location's top_k), /gradient
with upstream_nodes, /jvp with a node write, /tokenize and /model on a few English
prompts, plus autoencoder requests when /model lists an autoencoder. A 503 with
Retry-After is counted, and the client sleeps for that long before its next request.
Meanwhile a probe requests /health every --health-interval seconds.

At the end it prints throughput, latency percentiles, status counts, the /health probe
latency and the memory growth, stops the service with SIGTERM and checks that it exited
with status 0. /health probes slower than 1 s, and moments when this script's own threads
woke up late (a sign that the whole machine was busy), are listed with their times, to be
matched against the service's log. It exits with status 1 if any response was neither a 200 nor a 503 with
Retry-After, if a /health probe failed, if memory grew by more than --max-memory-growth
percent, or if the service did not stop cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import httpx

logger = logging.getLogger("load_test")

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

PROMPTS = (
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "The quick brown fox jumps over the lazy dog, and then it",
    "In 1969, two astronauts became the first people to walk on the surface of the",
    "She opened the old wooden door slowly and stepped into the dark",
    "Water boils at one hundred degrees Celsius at sea level, but on a high mountain it",
)

# Relative frequency of each request kind. Autoencoder kinds are sent only when /model
# lists an autoencoder.
KIND_WEIGHTS = {
    "activation_node": 3,
    "activation_top_k": 2,
    "gradient": 2,
    "jvp": 2,
    "tokenize": 1,
    "model": 1,
}
AUTOENCODER_KIND_WEIGHTS = {
    "activation_autoencoder_node": 1,
    "activation_autoencoder_top_k": 1,
}
TOP_K = 10
# Fraction of model requests that send token_ids instead of prompt text.
TOKEN_IDS_FRACTION = 0.25
LOG_TAIL_LINES = 40
# Unexpected responses logged as they happen; the report counts them all.
UNEXPECTED_LOG_LIMIT = 10
# A /health probe slower than this, or a wake-up of the load test's own threads later than
# this, is listed with its time in the report.
SLOW_PROBE_S = 1.0
SCHEDULING_TICK_S = 0.05


# ---------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class PlannedRequest:
    """One HTTP request of the load, and the response key that a 200 must contain."""

    kind: str
    method: str
    path: str
    body: dict[str, Any] | None
    expected_key: str

    @property
    def label(self) -> str:
        return f"{self.method} {self.path} {self.kind}"


@dataclass(frozen=True)
class Prompt:
    text: str
    token_ids: list[int]


class RequestFactory:
    """Builds random but valid requests for the loaded model, from its /model description."""

    def __init__(self, model_info: dict[str, Any], prompts: Sequence[Prompt]) -> None:
        self.n_layers: int = model_info["n_layers"]
        if self.n_layers < 2:
            # /jvp and /gradient requests need a layer that writes before another one reads.
            raise RuntimeError(f"the model has {self.n_layers} layer; the load test needs at least 2")
        self.n_heads: int = model_info["n_heads"]
        self.d_mlp: int = model_info["d_mlp"]
        self.autoencoders: list[dict[str, Any]] = list(model_info["autoencoders"])
        self.prompts = list(prompts)
        weights = dict(KIND_WEIGHTS)
        if self.autoencoders:
            weights.update(AUTOENCODER_KIND_WEIGHTS)
        self.kinds = list(weights)
        self.weights = list(weights.values())

    def random_request(self, rng: random.Random) -> PlannedRequest:
        kind = rng.choices(self.kinds, self.weights)[0]
        if kind == "tokenize":
            return PlannedRequest(kind, "POST", "/tokenize", {"prompt": rng.choice(self.prompts).text}, "token_ids")
        if kind == "model":
            return PlannedRequest(kind, "GET", "/model", None, "id")

        prompt = rng.choice(self.prompts)
        body: dict[str, Any] = (
            {"token_ids": prompt.token_ids} if rng.random() < TOKEN_IDS_FRACTION else {"prompt": prompt.text}
        )
        n_tokens = len(prompt.token_ids)
        if kind == "activation_node":
            body["trace_config"] = {"node": self._model_node(rng, rng.randrange(self.n_layers), n_tokens)}
            return PlannedRequest(kind, "POST", "/activation", body, "activation")
        if kind == "activation_top_k":
            body["location"] = {"type": "mlp_neuron", "layer": rng.randrange(self.n_layers)}
            body["top_k"] = TOP_K
            if rng.random() < 0.5:
                body["token"] = -1
            return PlannedRequest(kind, "POST", "/activation", body, "top")
        if kind == "gradient":
            body.update(self._gradient_fields(rng, prompt))
            return PlannedRequest(kind, "POST", "/gradient", body, "direct_effects")
        if kind == "jvp":
            write_layer = rng.randrange(self.n_layers - 1)
            write_node = {
                "type": "mlp_neuron",
                "layer": write_layer,
                "token": rng.randrange(n_tokens),
                "neuron": rng.randrange(self.d_mlp),
            }
            body["write"] = {"node": write_node}
            body["downstream"] = {"type": "mlp_neuron", "layer": rng.randrange(write_layer + 1, self.n_layers)}
            return PlannedRequest(kind, "POST", "/jvp", body, "jvp")

        autoencoder = rng.choice(self.autoencoders)
        layer = rng.choice(autoencoder["layers"])
        if kind == "activation_autoencoder_node":
            node = {
                "type": "autoencoder_latent",
                "autoencoder": autoencoder["id"],
                "layer": layer,
                "token": rng.randrange(n_tokens),
                "latent": rng.randrange(autoencoder["n_latents"]),
            }
            body["trace_config"] = {"node": node}
            return PlannedRequest(kind, "POST", "/activation", body, "activation")
        if kind == "activation_autoencoder_top_k":
            body["location"] = {"type": "autoencoder_latent", "autoencoder": autoencoder["id"], "layer": layer}
            body["token"] = -1
            body["top_k"] = TOP_K
            return PlannedRequest(kind, "POST", "/activation", body, "top")
        raise AssertionError(f"unknown request kind {kind!r}")

    def _model_node(self, rng: random.Random, layer: int, n_tokens: int) -> dict[str, Any]:
        """Return an MLP neuron or an attention head node at `layer`, on a random token of the prompt."""
        token = rng.randrange(n_tokens)
        if rng.random() < 0.5:
            return {"type": "mlp_neuron", "layer": layer, "token": token, "neuron": rng.randrange(self.d_mlp)}
        return {
            "type": "attention_head",
            "layer": layer,
            "token": token,
            "attended_token": rng.randrange(token + 1),
            "head": rng.randrange(self.n_heads),
        }

    def _gradient_fields(self, rng: random.Random, prompt: Prompt) -> dict[str, Any]:
        """Return a trace_config and three upstream_nodes: two that write before it, one that may not."""
        n_tokens = len(prompt.token_ids)
        if rng.random() < 0.3:
            # The logit difference between two tokens of the prompt, traced at the last position.
            target, distractor = rng.sample(sorted(set(prompt.token_ids)), 2)
            trace_node: dict[str, Any] = {
                "type": "logit_diff",
                "token": -1,
                "target_token_id": target,
                "distractor_token_id": distractor,
            }
            layer = self.n_layers - 1
            token = n_tokens - 1
        else:
            layer = rng.randrange(1, self.n_layers)
            token = rng.randrange(n_tokens)
            trace_node = {"type": "mlp_neuron", "layer": layer, "token": token, "neuron": rng.randrange(self.d_mlp)}
        upstream_nodes = [
            {"type": "mlp_neuron", "layer": rng.randrange(layer), "token": token, "neuron": rng.randrange(self.d_mlp)},
            {
                "type": "attention_head",
                "layer": rng.randrange(layer),
                "token": token,
                "attended_token": rng.randrange(token + 1),
                "head": rng.randrange(self.n_heads),
            },
            self._model_node(rng, layer, n_tokens),
        ]
        return {"trace_config": {"node": trace_node}, "upstream_nodes": upstream_nodes}


# ---------------------------------------------------------------------------------------
# Results


@dataclass
class Outcome:
    """The result of one request: its status (None when no response came) and its latency."""

    label: str
    status: int | None
    latency_s: float
    expected: bool
    problem: str | None = None


@dataclass
class LoadRecord:
    """Everything measured while the load runs."""

    outcomes: list[Outcome] = field(default_factory=list)
    health_latencies_s: list[float] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)
    rss_samples_kib: list[int] = field(default_factory=list)
    slow_probes: list[str] = field(default_factory=list)
    scheduling_lag_max_s: float = 0.0
    scheduling_stalls: list[str] = field(default_factory=list)
    steal_s: float | None = None
    started: float = 0.0
    finished: float = 0.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values`; `fraction` is between 0 and 1."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float | int]:
    """Return count, p50, p95, p99 and max of `latencies_s`, in milliseconds."""
    return {
        "count": len(latencies_s),
        "p50_ms": percentile(latencies_s, 0.50) * 1000,
        "p95_ms": percentile(latencies_s, 0.95) * 1000,
        "p99_ms": percentile(latencies_s, 0.99) * 1000,
        "max_ms": max(latencies_s, default=float("nan")) * 1000,
    }


def parse_retry_after(value: str | None) -> float | None:
    """Return a Retry-After header's delay in seconds, or None if it is missing or not a number of seconds."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


# ---------------------------------------------------------------------------------------
# The service process


def free_port() -> int:
    # NOTE: another process may take the port before the service binds it. The service then
    # fails to start, and the script reports the end of its log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def read_rss_kib(pid: int) -> int:
    """Return the process's resident set size (VmRSS in /proc/PID/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line; is the process still running?")


class ServiceProcess:
    """`python -m service` running as a child process, with its output in a log file."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.command = command
        self.log_path = log_path
        self._log_file: TextIO | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        logger.info("starting the service: %s", shlex.join(self.command))
        self._log_file = self.log_path.open("w", encoding="utf-8")
        self.started_at = time.monotonic()
        # A new session keeps a Ctrl-C in the terminal from reaching the service, which this
        # script stops itself with SIGTERM.
        self.process = subprocess.Popen(
            self.command, cwd=REPO_ROOT, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def count_log_lines(self, level: str) -> int:
        if not self.log_path.exists():
            return 0
        marker = f" {level} "
        with self.log_path.open(encoding="utf-8", errors="replace") as log:
            return sum(1 for line in log if marker in line)

    async def wait_until_healthy(self, base_url: str, timeout_s: float) -> None:
        """Poll /health until it returns 200; raise RuntimeError on timeout or if the service exits."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=base_url, timeout=5.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the service exited with status {self.process.returncode} during start-up")
                try:
                    response = await client.get("/health")
                    if response.status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # Not listening yet.
                if time.monotonic() > deadline:
                    raise RuntimeError(f"/health did not return 200 within {timeout_s:.0f} s")
                await asyncio.sleep(0.5)

    def stop(self, timeout_s: float) -> int | None:
        """Send SIGTERM and wait for the exit; return its status, or None if it had to be killed."""
        if self.process is None:
            return None
        try:
            if self.process.poll() is None:
                logger.info("stopping the service (pid %d) with SIGTERM", self.process.pid)
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    logger.error("the service did not exit within %.0f s of SIGTERM; killing it", timeout_s)
                    self.process.kill()
                    self.process.wait()
                    return None
            return self.process.returncode
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None


# ---------------------------------------------------------------------------------------
# The load


class LoadBudget:
    """Hands out request slots until the request count or the deadline is reached.

    With `count_only_ok`, only 200 responses count towards `max_requests`, so a run against a
    full queue still does that much model work. Requests already in flight when the count is
    reached still finish, so up to one more 200 per client can arrive.
    """

    def __init__(self, max_requests: int | None, duration_s: float, count_only_ok: bool = False) -> None:
        self.remaining = max_requests
        self.deadline = time.monotonic() + duration_s
        self.count_only_ok = count_only_ok

    def take(self) -> bool:
        if time.monotonic() >= self.deadline:
            return False
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        if not self.count_only_ok:
            self.remaining -= 1
        return True

    def record(self, outcome: Outcome) -> None:
        if self.count_only_ok and self.remaining is not None and outcome.status == 200:
            self.remaining -= 1

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


async def send_request(client: httpx.AsyncClient, request: PlannedRequest) -> tuple[Outcome, float | None]:
    """Send one request; return its outcome and the Retry-After delay of a 503, if any."""
    started = time.perf_counter()
    try:
        response = await client.request(request.method, request.path, json=request.body)
    except httpx.HTTPError as error:
        latency = time.perf_counter() - started
        return Outcome(request.label, None, latency, False, f"{type(error).__name__}: {error}"), None
    latency = time.perf_counter() - started

    status = response.status_code
    if status == 503:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is None:
            problem = f"503 without a valid Retry-After header: {response.headers.get('retry-after')!r}"
            return Outcome(request.label, status, latency, False, problem), None
        return Outcome(request.label, status, latency, True), retry_after
    if status != 200:
        return Outcome(request.label, status, latency, False, response.text[:300]), None
    try:
        content = response.json()
    except ValueError as error:
        return Outcome(request.label, status, latency, False, f"200 with a body that is not JSON: {error}"), None
    if not isinstance(content, dict) or request.expected_key not in content:
        problem = f"200 without the field {request.expected_key!r}"
        return Outcome(request.label, status, latency, False, problem), None
    return Outcome(request.label, status, latency, True), None


async def run_client(
    base_url: str,
    factory: RequestFactory,
    budget: LoadBudget,
    rng: random.Random,
    outcomes: list[Outcome],
    timeout_s: float,
) -> None:
    """Send requests one after another until the budget runs out, sleeping for each 503's Retry-After."""
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as client:
        while budget.take():
            outcome, retry_after = await send_request(client, factory.random_request(rng))
            outcomes.append(outcome)
            budget.record(outcome)
            if not outcome.expected and sum(1 for item in outcomes if not item.expected) <= UNEXPECTED_LOG_LIMIT:
                logger.warning("%s: unexpected response %s: %s", outcome.label, outcome.status, outcome.problem)
            if retry_after is not None:
                await asyncio.sleep(min(retry_after, budget.seconds_left()))


def probe_health(
    base_url: str, pid: int, interval_s: float, timeout_s: float, record: LoadRecord, stop: threading.Event
) -> None:
    """Request /health and sample the service's memory every `interval_s` until `stop` is set.

    It runs on its own thread with a blocking client, so the load's event loop cannot delay it.
    """
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = client.get("/health")
                latency = time.perf_counter() - started
                record.health_latencies_s.append(latency)
                if latency > SLOW_PROBE_S:
                    record.slow_probes.append(f"{wall_clock(time.time() - latency)} took {latency * 1000:.0f} ms")
                if response.status_code != 200:
                    record.health_failures.append(f"status {response.status_code} after {latency * 1000:.0f} ms")
            except httpx.HTTPError as error:
                record.health_failures.append(f"{type(error).__name__} after {time.perf_counter() - started:.1f} s")
            record.rss_samples_kib.append(read_rss_kib(pid))
            stop.wait(interval_s)


def watch_scheduling_lag(record: LoadRecord, stop: threading.Event) -> None:
    """Record how late this thread wakes up from short sleeps until `stop` is set.

    A late wake-up means that this process was not running, so a slow /health probe at the
    same time points to the machine rather than to the service.
    """
    while True:
        sleep_started = time.perf_counter()
        if stop.wait(SCHEDULING_TICK_S):
            return
        lag = time.perf_counter() - sleep_started - SCHEDULING_TICK_S
        record.scheduling_lag_max_s = max(record.scheduling_lag_max_s, lag)
        if lag > SLOW_PROBE_S:
            record.scheduling_stalls.append(f"{wall_clock(time.time() - lag)} woke up {lag * 1000:.0f} ms late")


def wall_clock(timestamp: float) -> str:
    """Format a time.time() value like the service's log timestamps, to match lines in its log."""
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]


def cpu_steal_seconds() -> float | None:
    """Return the CPU time the hypervisor gave to other guests since boot (steal in /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


async def run_load(
    base_url: str,
    factory: RequestFactory,
    clients: int,
    max_requests: int | None,
    duration_s: float,
    timeout_s: float,
    seed: int,
    count_only_ok: bool = False,
) -> list[Outcome]:
    """Run `clients` concurrent clients until the request count or the duration is reached."""
    budget = LoadBudget(max_requests, duration_s, count_only_ok)
    outcomes: list[Outcome] = []
    tasks = [
        run_client(base_url, factory, budget, random.Random(seed * 1000 + index), outcomes, timeout_s)
        for index in range(clients)
    ]
    await asyncio.gather(*tasks)
    return outcomes


async def fetch_setup(base_url: str) -> tuple[dict[str, Any], list[Prompt]]:
    """Return /model's description and the token ids of each prompt."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0) as client:
        response = await client.get("/model")
        response.raise_for_status()
        model_info: dict[str, Any] = response.json()
        prompts = []
        for text in PROMPTS:
            response = await client.post("/tokenize", json={"prompt": text})
            response.raise_for_status()
            prompts.append(Prompt(text, response.json()["token_ids"]))
    return model_info, prompts


# ---------------------------------------------------------------------------------------
# Report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_timeline_mib(samples_kib: Sequence[int], points: int = 5) -> list[float]:
    """Return the RSS samples at evenly spaced points of the load, first and last included, in MiB."""
    if not samples_kib:
        return []
    last = len(samples_kib) - 1
    return [round(samples_kib[round(last * index / (points - 1))] / 1024, 1) for index in range(points)]


def summarize(
    arguments: argparse.Namespace,
    command: str,
    service_command: str,
    model_info: dict[str, Any],
    warmup: list[Outcome],
    record: LoadRecord,
    startup_s: float,
    rss_before_kib: int,
    rss_after_kib: int,
) -> dict[str, Any]:
    """Collect every figure of the run into one JSON-ready dict."""
    outcomes = record.outcomes
    elapsed = record.finished - record.started
    ok = [outcome for outcome in outcomes if outcome.status == 200 and outcome.expected]
    rejected = [outcome for outcome in outcomes if outcome.status == 503 and outcome.expected]
    unexpected = [outcome for outcome in outcomes if not outcome.expected]
    per_kind: dict[str, Any] = {}
    for label in sorted({outcome.label for outcome in outcomes}):
        of_label = [outcome for outcome in outcomes if outcome.label == label]
        summary = latency_summary([outcome.latency_s for outcome in of_label if outcome.status == 200])
        summary["sent"] = len(of_label)
        summary["status_503"] = sum(1 for outcome in of_label if outcome.status == 503)
        per_kind[label] = summary
    status_counts = Counter("none" if outcome.status is None else str(outcome.status) for outcome in outcomes)
    growth_percent = (rss_after_kib - rss_before_kib) / rss_before_kib * 100

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "service_command": service_command,
        "machine": {
            "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "cpu_model": cpu_model(),
            "load_average_after": [round(value, 2) for value in os.getloadavg()],
            "cpu_steal_during_load_s": record.steal_s,
            "load_test_scheduling_lag_max_ms": record.scheduling_lag_max_s * 1000,
            "load_test_stalls": record.scheduling_stalls,
        },
        "model": {"id": model_info["id"], "device": model_info["device"], "dtype": model_info["dtype"]},
        "autoencoders": [autoencoder["id"] for autoencoder in model_info["autoencoders"]],
        "startup_s": startup_s,
        "clients": arguments.clients,
        "warmup_requests": len(warmup),
        "warmup_unexpected": sum(1 for outcome in warmup if not outcome.expected),
        "requests": len(outcomes),
        "duration_s": elapsed,
        "requests_per_s": len(outcomes) / elapsed if elapsed > 0 else float("nan"),
        "ok_per_s": len(ok) / elapsed if elapsed > 0 else float("nan"),
        "latency_200": latency_summary([outcome.latency_s for outcome in ok]),
        "latency_503": latency_summary([outcome.latency_s for outcome in rejected]),
        "per_kind": per_kind,
        "status_counts": dict(sorted(status_counts.items())),
        "unexpected": len(unexpected),
        "unexpected_examples": [
            {"label": outcome.label, "status": outcome.status, "problem": outcome.problem} for outcome in unexpected[:10]
        ],
        "health": {
            **latency_summary(record.health_latencies_s),
            "failures": len(record.health_failures),
            "failure_examples": record.health_failures[:10],
            "slow_probes": record.slow_probes,
        },
        "memory": {
            "rss_before_mib": rss_before_kib / 1024,
            "rss_after_mib": rss_after_kib / 1024,
            "rss_max_during_mib": max(record.rss_samples_kib, default=rss_after_kib) / 1024,
            "growth_percent": growth_percent,
            "rss_timeline_mib": rss_timeline_mib(record.rss_samples_kib),
        },
    }


def print_report(figures: dict[str, Any]) -> None:
    machine = figures["machine"]
    print(f"command:  {figures['command']}")
    print(f"service:  {figures['service_command']}")
    print(f"date:     {figures['date']}")
    print(
        f"machine:  {machine['cpu_count']} CPUs ({machine['usable_cpus']} usable), {machine['cpu_model']}; "
        f"load average after the run {machine['load_average_after']}"
    )
    model = figures["model"]
    autoencoders = ", ".join(figures["autoencoders"]) or "none"
    print(
        f"model:    {model['id']} on {model['device']} as {model['dtype']}; autoencoders: {autoencoders}; "
        f"/health returned 200 {figures['startup_s']:.1f} s after the start"
    )
    print(
        f"load:     {figures['clients']} clients, {figures['requests']} requests in {figures['duration_s']:.1f} s "
        f"= {figures['requests_per_s']:.2f} requests/s ({figures['ok_per_s']:.2f} 200s/s), "
        f"after {figures['warmup_requests']} warm-up requests"
    )
    print("statuses: " + ", ".join(f"{status}: {count}" for status, count in figures["status_counts"].items()))
    print(f"unexpected responses (neither 200 nor 503 with Retry-After): {figures['unexpected']}")
    for example in figures["unexpected_examples"]:
        print(f"  {example['label']}: {example['status']}: {example['problem']}")

    print()
    header = f"{'latency of 200 responses, ms':<48} {'200s':>6} {'503s':>6} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}"
    print(header)

    def row(name: str, summary: dict[str, Any], rejected: int | str) -> str:
        return (
            f"{name:<48} {summary['count']:>6} {rejected:>6} {summary['p50_ms']:>8.0f} {summary['p95_ms']:>8.0f} "
            f"{summary['p99_ms']:>8.0f} {summary['max_ms']:>8.0f}"
        )

    print(row("all", figures["latency_200"], figures["status_counts"].get("503", 0)))
    for label, summary in figures["per_kind"].items():
        print(row(label, summary, summary["status_503"]))
    if figures["latency_503"]["count"]:
        rejected = figures["latency_503"]
        print(f"503 latency: p50 {rejected['p50_ms']:.0f} ms, p99 {rejected['p99_ms']:.0f} ms, max {rejected['max_ms']:.0f} ms")

    print()
    health = figures["health"]
    print(
        f"/health:  {health['count']} probes, p50 {health['p50_ms']:.0f} ms, p99 {health['p99_ms']:.0f} ms, "
        f"max {health['max_ms']:.0f} ms, failures {health['failures']}"
    )
    for failure in health["failure_examples"]:
        print(f"  {failure}")
    for slow_probe in health["slow_probes"]:
        print(f"  probe at {slow_probe}")
    steal = machine["cpu_steal_during_load_s"]
    steal_text = "unknown" if steal is None else f"{steal:.1f} s"
    print(
        f"          this script's threads woke up at most {machine['load_test_scheduling_lag_max_ms']:.0f} ms late; "
        f"CPU steal time during the load: {steal_text}"
    )
    for stall in machine["load_test_stalls"]:
        print(f"  this script {stall}")
    memory = figures["memory"]
    print(
        f"memory:   RSS {memory['rss_before_mib']:.1f} MiB after warm-up, {memory['rss_after_mib']:.1f} MiB after "
        f"the load ({memory['growth_percent']:+.2f} %), max during the load {memory['rss_max_during_mib']:.1f} MiB"
    )
    timeline = " -> ".join(f"{value:.1f}" for value in memory["rss_timeline_mib"])
    print(f"          RSS at 0, 25, 50, 75 and 100 % of the load: {timeline} MiB")
    print(f"service:  exit status {figures['service_exit_status']}, {figures['service_error_log_lines']} ERROR log lines")


# ---------------------------------------------------------------------------------------
# Main


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse the script's flags; arguments after `--` are returned separately for the service."""
    service_extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, service_extra = argv[:split], argv[split + 1 :]

    parser = argparse.ArgumentParser(
        description="Start the attribution service on 127.0.0.1, load-test it, and check its memory, "
        "/health latency and status codes. Arguments after '--' go to 'python -m service'.",
        epilog="example: scripts/load_test.py --requests 3000 --duration 1800 -- --max-tokens 256",
    )
    parser.add_argument("--model", help="model source passed to the service's --model (default: the service's default)")
    parser.add_argument(
        "--max-queue", type=int, help="passed to the service's --max-queue; a small value exercises the 503 path"
    )
    parser.add_argument("--clients", type=int, default=16, help="number of concurrent clients (default: 16)")
    parser.add_argument(
        "--requests",
        type=int,
        help="stop after this many requests, 503s included, not counting the warm-up (default: no count limit)",
    )
    parser.add_argument(
        "--duration", type=float, default=120.0, help="stop after this many seconds of load (default: 120)"
    )
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=64,
        help="the clients first send requests until this many returned 200 (or --duration passed), then the "
        "memory baseline is read; these requests are not in the figures (default: 64)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds before a request counts as failed (default: 120)"
    )
    parser.add_argument(
        "--health-interval", type=float, default=0.5, help="seconds between /health probes (default: 0.5)"
    )
    parser.add_argument(
        "--health-timeout",
        type=float,
        default=5.0,
        help="seconds before a /health probe counts as failed (default: 5)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for /health to return 200 after starting the service (default: 300)",
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=60.0, help="seconds to wait for the service to exit after SIGTERM (default: 60)"
    )
    parser.add_argument(
        "--max-memory-growth",
        type=float,
        default=5.0,
        help="fail if the service's RSS grew by more than this percentage during the load (default: 5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random request mix (default: 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument(
        "--service-log",
        type=Path,
        metavar="PATH",
        help="file for the service's output (default: a new file in the temporary directory)",
    )
    arguments = parser.parse_args(argv)
    if arguments.clients < 1:
        parser.error("--clients must be at least 1")
    if arguments.requests is not None and arguments.requests < 1:
        parser.error("--requests must be at least 1")
    if arguments.duration <= 0:
        parser.error("--duration must be positive")
    if arguments.warmup_requests < 0:
        parser.error("--warmup-requests must not be negative")
    return arguments, service_extra


def service_command(arguments: argparse.Namespace, port: int, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "service", "--host", HOST, "--port", str(port)]
    if arguments.model is not None:
        command += ["--model", arguments.model]
    if arguments.max_queue is not None:
        command += ["--max-queue", str(arguments.max_queue)]
    return command + extra


async def exercise(arguments: argparse.Namespace, service: ServiceProcess, base_url: str) -> dict[str, Any]:
    """Wait for the service, warm it up, run the load with the /health probe, and return the figures."""
    await service.wait_until_healthy(base_url, arguments.startup_timeout)
    startup_s = time.monotonic() - service.started_at
    logger.info("/health returned 200 %.1f s after the service started", startup_s)

    model_info, prompts = await fetch_setup(base_url)
    factory = RequestFactory(model_info, prompts)
    if factory.autoencoders:
        logger.info("sending autoencoder requests for %s", ", ".join(item["id"] for item in factory.autoencoders))
    else:
        logger.info("/model lists no autoencoders, so no autoencoder requests are sent")

    warmup: list[Outcome] = []
    if arguments.warmup_requests:
        logger.info("warming up until %d requests returned 200", arguments.warmup_requests)
        warmup = await run_load(
            base_url,
            factory,
            arguments.clients,
            arguments.warmup_requests,
            arguments.duration,
            arguments.request_timeout,
            arguments.seed + 1,
            count_only_ok=True,
        )
    rss_before = read_rss_kib(service.pid)
    logger.info("RSS after warm-up: %.1f MiB", rss_before / 1024)

    limits = f"{arguments.requests} requests or " if arguments.requests else ""
    logger.info("running %d clients for %s%.0f s", arguments.clients, limits, arguments.duration)
    record = LoadRecord(started=time.monotonic())
    steal_before = cpu_steal_seconds()
    stop_threads = threading.Event()
    probe = asyncio.create_task(
        asyncio.to_thread(
            probe_health, base_url, service.pid, arguments.health_interval, arguments.health_timeout, record, stop_threads
        )
    )
    watcher = asyncio.create_task(asyncio.to_thread(watch_scheduling_lag, record, stop_threads))
    try:
        record.outcomes = await run_load(
            base_url,
            factory,
            arguments.clients,
            arguments.requests,
            arguments.duration,
            arguments.request_timeout,
            arguments.seed,
        )
        record.finished = time.monotonic()
    finally:
        # Stop the threads on cancellation too, because asyncio.run waits for them before it returns.
        stop_threads.set()
    await probe
    await watcher
    rss_after = read_rss_kib(service.pid)
    steal_after = cpu_steal_seconds()
    if steal_before is not None and steal_after is not None:
        record.steal_s = steal_after - steal_before
    logger.info("load finished: %d requests in %.1f s", len(record.outcomes), record.finished - record.started)

    return summarize(
        arguments,
        shlex.join([sys.executable, *sys.argv]),
        shlex.join(service.command),
        model_info,
        warmup,
        record,
        startup_s,
        rss_before,
        rss_after,
    )


def failures_of(figures: dict[str, Any], max_memory_growth: float) -> list[str]:
    failures = []
    if figures["warmup_unexpected"]:
        failures.append(f"{figures['warmup_unexpected']} unexpected responses during the warm-up")
    if figures["unexpected"]:
        failures.append(f"{figures['unexpected']} responses were neither a 200 nor a 503 with Retry-After")
    if figures["health"]["failures"]:
        failures.append(f"{figures['health']['failures']} /health probes failed")
    if figures["memory"]["growth_percent"] > max_memory_growth:
        failures.append(
            f"RSS grew by {figures['memory']['growth_percent']:.2f} %, over the limit of {max_memory_growth} %"
        )
    if figures["service_exit_status"] != 0:
        failures.append(f"the service exited with status {figures['service_exit_status']} after SIGTERM, not 0")
    return failures


def raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    arguments, service_extra = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    # Turn SIGTERM into an exception, so the `finally` below still stops the service, which
    # runs in its own session and would otherwise outlive this script.
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    port = free_port()
    if arguments.service_log is not None:
        log_path = arguments.service_log
    else:
        descriptor, name = tempfile.mkstemp(prefix="load-test-service-", suffix=".log")
        os.close(descriptor)
        log_path = Path(name)
    service = ServiceProcess(service_command(arguments, port, service_extra), log_path)
    service.start()
    figures: dict[str, Any] | None = None
    try:
        figures = asyncio.run(exercise(arguments, service, f"http://{HOST}:{port}"))
    except (RuntimeError, OSError, httpx.HTTPError) as error:
        logger.error("%s; the service's log (%s) ends with:\n%s", error, log_path, service.log_tail())
    finally:
        exit_status = service.stop(arguments.stop_timeout)
    logger.info("the service exited with status %s; its log is %s", exit_status, log_path)
    if figures is None:
        return 1

    figures["service_exit_status"] = exit_status
    figures["service_error_log_lines"] = service.count_log_lines("ERROR")
    figures["service_log"] = str(log_path)
    print_report(figures)
    failures = failures_of(figures, arguments.max_memory_growth)
    figures["failures"] = failures
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        logger.info("wrote the figures to %s", arguments.json)
    if failures:
        for failure in failures:
            logger.error("check failed: %s", failure)
        logger.error("the service's log (%s) ends with:\n%s", log_path, service.log_tail())
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
