"""CPU overhead of our LLM path over raw HTTP clients, against a fake upstream on loopback.

Every client runs in its own worker process, so each one's CPU time is its own (process CPU
time, all threads, user + sys: LiteLLM does part of every call in a thread pool and its
success logging in background tasks, and both count). The fake upstream (tests.support's
OpenAI-compatible or Anthropic fake) runs in another process, so its CPU is never counted.
Workers:

    raw          aiohttp.ClientSession: one POST, the JSON parsed (streams: every SSE line
                 parsed); the reference the targets are ratios to
    raw_httpx    the same with httpx.AsyncClient
    acompletion  bare litellm.acompletion with the same global LiteLLM settings as the gateway
    gateway      generation.llm.gateway.LLMGateway (LiteLLM's provider layer on our pooled
                 aiohttp client, inside the retry/fallback/cooldown loop, default
                 router_settings), called with a deadline-derived timeout_s as Generate passes
                 it (a new value on every call)
    gateway_httpx  the same gateway on the pooled httpx client (ML_SERVING_LLM_HTTP_CLIENT)
    <name>       one per --baseline-llm FILE (named after the file): the gateway worker from
                 another copy of gateway.py, for before/after, e.g. the committed one:
                 `git show HEAD:ml_serving/generation/llm/gateway.py > /tmp/gateway_head.py`
    server       with --server: the whole RPC. The worker starts `python -m ml_serving` (INFO
                 access log, its LLM route on the fake upstream, fallback off) and calls
                 Generate and GenerateStream over gRPC; its CPU is the server process's (all
                 threads, /proc/<pid>/task/*/schedstat, in ns), not the worker's. Each batch
                 also makes as many ListPromptVersions calls (the floor: a trivial RPC's gRPC
                 and layer cost), and the report gives the whole call above that floor against
                 the raw client, per unary call and per streamed chunk (the upstream's chunks,
                 as the raw client counts them). --server-checkout DIR (repeatable) adds one
                 such worker per other checkout (before/after; `git worktree add DIR <commit>`).

Each worker makes --warmup calls of each kind first. Then, per round, each worker in turn
(the order rotates every round) makes --calls unary calls and --streams streamed calls while
the others wait; the report gives, per worker, the median over the rounds of: CPU ms per unary
call, wall p50 ms per unary call, CPU ms per stream and per streamed chunk; the median over
the rounds of the same round's difference to, and ratio to, the raw aiohttp client; and the
issue's targets (per call <= 1.5 ms and <= 3x raw; per chunk <= 0.25 ms and <= 3x raw) checked
for the gateway. Several interleaved rounds, paired differences and medians, because shared
machines are noisy.

    .venv/bin/python -m scripts.llm_overhead                  # 9 rounds x (100 unary + 20 streams)
    .venv/bin/python -m scripts.llm_overhead --rounds 7 --json overhead.json
    .venv/bin/python -m scripts.llm_overhead --upstream anthropic    # Anthropic's format
    .venv/bin/python -m scripts.llm_overhead --baseline-llm /tmp/gateway_head.py --count-calls
    .venv/bin/python -m scripts.llm_overhead --model openai/my-vllm-model   # a model LiteLLM
                                                              # has no price for

--count-calls adds a noise-free complement: Python function calls (all threads) per unary
call and per streamed token, counted by extra workers after the timed rounds.

`make bench` runs the --server measurement with only the raw and server workers (whole_rpc) as
its generate_overhead scenario, which bench/thresholds.json judges against issue 26's targets.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "openai/gpt-4o-mini"
"""A model LiteLLM knows (as production routes name them); the fake upstream answers any name.
--model picks another (every LiteLLM worker uses it)."""
ANTHROPIC_MODEL = "anthropic/claude-3-5-haiku-20241022"
"""The default model with --upstream anthropic."""
API_KEY = "sk-llm-overhead-not-a-real-key"
MESSAGES = (
    {"role": "system", "content": "You are a concise sleep coach. " * 30},
    {"role": "user", "content": "Give me one small tip about sleep for tonight."},
)
MAX_TOKENS = 64
MARGIN_S = 0.05
"""Kept back from the deadline, as ML_SERVING_LLM_TIMEOUT_MARGIN_S does."""
KINDS = ("raw", "raw_httpx", "acompletion", "gateway", "gateway_httpx", "baseline", "server")
TARGETS = {"unary_cpu_ms": 1.5, "unary_ratio": 3.0, "chunk_cpu_ms": 0.25, "chunk_ratio": 3.0}
"""Issue 14's targets for the gateway: absolute CPU and ratio to the raw aiohttp client."""
SERVER_TARGETS = {"unary_ratio": 3.0, "chunk_ratio": 3.0}
"""Issue 26's targets for the whole RPC: server CPU above a trivial RPC's, over the raw client's."""


# --- the fake upstream (its own process) ---------------------------------------------------------


async def _serve_upstream(tokens: int, kind: str, token_delay_s: float) -> None:
    from tests.support.fake_anthropic import FakeAnthropic
    from tests.support.fake_openai import FakeOpenAI

    cls = FakeAnthropic if kind == "anthropic" else FakeOpenAI
    fake = await cls(tokens=tokens, token_delay_s=token_delay_s).start()
    print(fake.port, flush=True)
    # Serve until the parent closes our stdin (or dies).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await fake.stop()


# --- workers (one process each) ------------------------------------------------------------------

Call = Callable[[], Awaitable[int]]
"""One call; returns the number of text deltas it received (1 for a unary call)."""


def _load_llm(path: Path | None) -> ModuleType:
    if path is None:
        from ml_serving.generation.llm import gateway as llm

        return llm
    spec = importlib.util.spec_from_file_location("ml_serving_llm_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _raw_request(upstream: str, stream: bool) -> tuple[str, dict[str, Any], dict[str, str]]:
    """Path, body and headers a hand-written client sends, in the upstream's format."""
    if upstream == "anthropic":
        body: dict[str, Any] = {
            "model": "ok",
            "system": MESSAGES[0]["content"],
            "messages": [dict(MESSAGES[1])],
            "max_tokens": MAX_TOKENS,
        }
        headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
        if stream:
            body["stream"] = True
        return "/v1/messages", body, headers
    body = {"model": "ok", "messages": list(MESSAGES), "max_tokens": MAX_TOKENS}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return "/v1/chat/completions", body, {"Authorization": f"Bearer {API_KEY}"}


def _delta(upstream: str, chunk: dict[str, Any]) -> bool:
    """Whether a parsed SSE payload carries text."""
    if upstream == "anthropic":
        return chunk.get("type") == "content_block_delta" and bool(chunk["delta"].get("text"))
    return bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))


def _raw_calls(origin: str, upstream: str) -> tuple[Call, Call]:
    import aiohttp

    session = aiohttp.ClientSession()
    path, body, headers = _raw_request(upstream, False)
    _, stream_body, _ = _raw_request(upstream, True)

    async def unary() -> int:
        async with session.post(origin + path, json=body, headers=headers) as response:
            response.raise_for_status()
            await response.json()
        return 1

    async def stream() -> int:
        deltas = 0
        async with session.post(origin + path, json=stream_body, headers=headers) as response:
            response.raise_for_status()
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: ") and line != "data: [DONE]":
                    if _delta(upstream, json.loads(line[6:])):
                        deltas += 1
        return deltas

    return unary, stream


def _raw_httpx_calls(origin: str, upstream: str) -> tuple[Call, Call]:
    import httpx

    client = httpx.AsyncClient(timeout=30.0)
    path, body, headers = _raw_request(upstream, False)
    _, stream_body, _ = _raw_request(upstream, True)

    async def unary() -> int:
        response = await client.post(origin + path, json=body, headers=headers)
        response.raise_for_status()
        response.json()
        return 1

    async def stream() -> int:
        deltas = 0
        async with client.stream(
            "POST", origin + path, json=stream_body, headers=headers
        ) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    if _delta(upstream, json.loads(line[6:])):
                        deltas += 1
        return deltas

    return unary, stream


def _acompletion_calls(base: str, model: str) -> tuple[Call, Call]:
    # The same global LiteLLM settings the gateway runs with (tuning, applied at import).
    from ml_serving.generation.llm import provider

    litellm = provider.litellm

    common: dict[str, Any] = {
        "model": model,
        "api_base": base,
        "api_key": API_KEY,
        "max_tokens": MAX_TOKENS,
        "timeout": 10.0,
    }

    async def unary() -> int:
        response = await litellm.acompletion(messages=[dict(m) for m in MESSAGES], **common)
        _ = response.choices[0].message.content
        return 1

    async def stream() -> int:
        deltas = 0
        response = await litellm.acompletion(
            messages=[dict(m) for m in MESSAGES],
            stream=True,
            stream_options={"include_usage": True},
            **common,
        )
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                deltas += 1
        return deltas

    return unary, stream


def _gateway_calls(
    base: str,
    llm_file: Path | None,
    deadline_s: float,
    model: str,
    http_client: str = "aiohttp",
    coalesce_s: float = 0.0,
) -> tuple[Call, Call]:
    llm = _load_llm(llm_file)
    route = {"model": model, "api_base": base, "api_key": API_KEY, "timeout": 20}
    routes = llm.RouteConfig(
        model_list=({"model_name": "bench", "litellm_params": route},), router_settings={}
    )
    if llm_file is None:
        gateway = llm.LLMGateway(
            routes, "bench", http_client=http_client, stream_coalesce_s=coalesce_s
        )
    else:  # another copy of gateway.py: its own constructor
        gateway = llm.LLMGateway(routes, "bench")
    loop = asyncio.get_running_loop()

    def timeout_s(deadline: float) -> float:
        # As generation.py does: what is left of the caller's deadline, less the margin.
        return deadline - loop.time() - MARGIN_S

    async def unary() -> int:
        deadline = loop.time() + deadline_s
        completion = await gateway.complete(
            MESSAGES, max_tokens=MAX_TOKENS, temperature=None,
            timeout_s=timeout_s(deadline), offline_text="",
        )  # fmt: skip
        _ = completion.text
        return 1

    async def stream() -> int:
        deadline = loop.time() + deadline_s
        deltas = 0
        events: AsyncIterator[Any] = gateway.stream(
            MESSAGES, max_tokens=MAX_TOKENS, temperature=None,
            timeout_s=timeout_s(deadline), offline_text="",
        )  # fmt: skip
        async for event in events:
            if isinstance(event, str):
                deltas += 1
        return deltas

    return unary, stream


def _server_cpu_s(pid: int) -> float:
    """CPU seconds of every thread of process ``pid`` so far (schedstat: nanoseconds, not the
    10 ms ticks of /proc/<pid>/stat, which would round a batch of 1 ms calls by 10%)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total / 1e9


def _server_calls(
    base: str, model: str, checkout: Path
) -> tuple[Call, Call, Call, Callable[[], float], Callable[[], None]]:
    """Generate, GenerateStream and ListPromptVersions on a server from ``checkout``, its CPU
    clock, and what stops it."""
    import grpc
    import yaml

    from ml_serving._proto.mlserving.v1 import inference_service_pb2 as pb
    from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
    from tests.support.requests import generate_request, generate_stream_request
    from tests.support.server_process import ServerProcess

    config = Path(tempfile.mkdtemp(prefix="llm_overhead_server_")) / "llm.yaml"
    route = {"model": model, "api_base": base, "api_key": "os.environ/LLM_OVERHEAD_KEY"}
    config.write_text(
        yaml.safe_dump(
            {
                "model_list": [{"model_name": "bench", "litellm_params": route}],
                "router_settings": {"num_retries": 0, "disable_cooldowns": True},
            }
        )
    )
    server = ServerProcess(
        cwd=checkout,
        ML_SERVING_LOG_LEVEL="INFO",
        ML_SERVING_LLM_CONFIG=str(config),
        ML_SERVING_LLM_FALLBACK="false",
        LLM_OVERHEAD_KEY=API_KEY,
    )
    server.wait_ready()
    channel = grpc.aio.insecure_channel(server.address)
    stub: Any = pb_grpc.InferenceServiceStub(channel)
    unary_request = generate_request()
    unary_request.limits.max_tokens = MAX_TOKENS
    stream_request = generate_stream_request()
    stream_request.limits.max_tokens = MAX_TOKENS
    floor_request = pb.ListPromptVersionsRequest()

    async def unary() -> int:
        reply = await stub.Generate(unary_request, timeout=30)
        if reply.fallback or not reply.text:
            raise SystemExit("the server did not answer from the fake upstream")
        return 1

    async def stream() -> int:
        messages = 0
        async for message in stub.GenerateStream(stream_request, timeout=30):
            messages += bool(message.text_delta)
        return messages

    async def floor() -> int:
        await stub.ListPromptVersions(floor_request, timeout=30)
        return 1

    def stop() -> None:
        server.stop()

    return unary, stream, floor, lambda: _server_cpu_s(server.pid), stop


class _CallCounter:
    """Python function calls in every thread (a noise-free complement to CPU time): installed
    before any thread starts, counting only while on. It slows everything it watches, so only
    workers started with --count-calls have it."""

    def __init__(self) -> None:
        self.on = False
        self.calls = 0

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if self.on and event == "call":
            self.calls += 1

    def install(self) -> None:
        threading.setprofile(self)
        sys.setprofile(self)


_counter: _CallCounter | None = None


_clock: Callable[[], float] = time.process_time
"""Whose CPU a batch measures: this worker's, or the server's (the server worker)."""


async def _batch(call: Call, n: int) -> dict[str, float]:
    """n calls one after another: CPU per call (incl. background work they leave), wall p50."""
    gc.collect()
    await asyncio.sleep(0.05)
    walls: list[float] = []
    deltas = 0
    if _counter is not None:
        _counter.calls, _counter.on = 0, True
    cpu0 = _clock()
    for _ in range(n):
        t0 = time.perf_counter()
        deltas += await call()
        walls.append(time.perf_counter() - t0)
    await _settle()
    cpu = _clock() - cpu0
    result = {
        "cpu_ms": 1e3 * cpu / n,
        "wall_p50_ms": 1e3 * statistics.median(walls),
        "deltas": deltas / n,
    }
    if _counter is not None:
        _counter.on = False
        result["py_calls"] = _counter.calls / n
    return result


_idle_tasks = 0
"""Tasks a worker has while no call runs (LiteLLM's logging worker, ...)."""


def _other_tasks() -> int:
    me = asyncio.current_task()
    return sum(1 for t in asyncio.all_tasks() if t is not me and not t.done())


async def _settle() -> None:
    """Let the background tasks the calls left (LiteLLM's success logging) finish."""
    for _ in range(100):
        if _other_tasks() <= _idle_tasks:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)


async def _worker(
    kind: str,
    port: int,
    warmup: int,
    llm_file: Path | None,
    deadline: float,
    model: str,
    upstream: str,
    coalesce_s: float,
    checkout: Path,
) -> None:
    origin = f"http://127.0.0.1:{port}"
    base = origin if upstream == "anthropic" else f"{origin}/v1"
    floor: Call | None = None
    stop: Callable[[], None] | None = None
    if kind == "server":
        global _clock
        unary, stream, floor, _clock, stop = _server_calls(base, model, checkout)
    elif kind == "raw":
        unary, stream = _raw_calls(origin, upstream)
    elif kind == "raw_httpx":
        unary, stream = _raw_httpx_calls(origin, upstream)
    elif kind == "acompletion":
        unary, stream = _acompletion_calls(base, model)
    elif kind == "gateway_httpx":
        unary, stream = _gateway_calls(base, None, deadline, model, "httpx", coalesce_s)
    else:
        unary, stream = _gateway_calls(base, llm_file, deadline, model, "aiohttp", coalesce_s)
    for _ in range(warmup):
        await unary()
        await stream()
        if floor is not None:
            await floor()
    await asyncio.sleep(0.3)
    global _idle_tasks
    _idle_tasks = _other_tasks()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            mode, n = line.split()
            result = await _batch(unary if mode == "unary" else stream, int(n))
            if floor is not None:
                # The same number of trivial calls right after: this round's floor.
                result["floor_cpu_ms"] = (await _batch(floor, int(n)))["cpu_ms"]
            print(json.dumps(result), flush=True)
    finally:
        if stop is not None:
            stop()


# --- the orchestrator ----------------------------------------------------------------------------


@dataclass
class Worker:
    kind: str
    proc: subprocess.Popen[str]
    log: IO[str]
    results: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {"unary": [], "stream": []}
    )

    def stop(self) -> None:
        # End of input first: a worker then stops what it started (the server worker's
        # `python -m ml_serving`, which a kill would leave running) and exits.
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass  # it died already
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        _stop_process(self.proc)
        self.log.close()

    def ask(self, mode: str, n: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{mode} {n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.kind} died:\n{_tail(self.log)}")
        self.results[mode].append(json.loads(line))


def _stop_process(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


def _tail(log: IO[str]) -> str:
    log.flush()
    return Path(log.name).read_text(encoding="utf-8", errors="replace")[-4000:]


def _spawn(args: Sequence[str], log: IO[str]) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT,
    )  # fmt: skip


def _start_worker(
    name: str,
    port: int,
    opts: argparse.Namespace,
    llm: Path | None,
    *,
    count: bool = False,
    checkout: Path = ROOT,
) -> Worker:
    log = tempfile.NamedTemporaryFile("w+", prefix="llm_overhead_worker_", suffix=".log")
    kind = name if llm is None else "baseline"
    if name.startswith("server"):
        kind = "server"
    args = ["--worker", kind, "--port", str(port), "--warmup", str(opts.warmup)]
    args += ["--checkout", str(checkout)]
    args += ["--deadline-s", str(opts.deadline_s), "--model", opts.model]
    args += ["--upstream", opts.upstream, "--coalesce-s", str(opts.coalesce_s)]
    args += ["--count-calls"] if count else []
    if llm is not None:
        args += ["--llm-file", str(llm)]
    worker = Worker(name, _spawn(args, log), log)
    assert worker.proc.stdout is not None
    if worker.proc.stdout.readline().strip() != "READY":
        raise SystemExit(f"worker {name} did not start:\n{_tail(log)}")
    return worker


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def _paired(a: list[dict[str, float]], b: list[dict[str, float]], key: str, per: float) -> float:
    """Median over rounds of a - b: a round's workers ran back to back, so they shared its noise."""
    return statistics.median((x[key] - y[key]) / per for x, y in zip(a, b, strict=True))


def _ratio(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> float:
    """Median over rounds of a / b (per stream: the same tokens, so per chunk too)."""
    return statistics.median(x[key] / y[key] for x, y in zip(a, b, strict=True))


def _summary(workers: Sequence[Worker]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    raw = next(w for w in workers if w.kind == "raw").results
    bare = next(w for w in workers if w.kind == "acompletion").results
    for w in workers:
        unary, stream = w.results["unary"], w.results["stream"]
        if "floor_cpu_ms" in unary[0]:
            out[w.kind] = _server_summary(unary, stream, raw)
            continue
        tokens = _median(stream, "deltas")
        out[w.kind] = {
            "unary_cpu_ms": _median(unary, "cpu_ms"),
            "unary_wall_p50_ms": _median(unary, "wall_p50_ms"),
            "stream_cpu_ms": _median(stream, "cpu_ms"),
            "stream_wall_p50_ms": _median(stream, "wall_p50_ms"),
            "tokens_per_stream": tokens,
            "cpu_ms_per_token": _median(stream, "cpu_ms") / tokens,
            "calls_per_cpu_second": 1e3 / _median(unary, "cpu_ms"),
            "unary_cpu_over_raw_ms": _paired(unary, raw["unary"], "cpu_ms", 1),
            "unary_cpu_ratio_to_raw": _ratio(unary, raw["unary"], "cpu_ms"),
            "token_cpu_ratio_to_raw": _ratio(stream, raw["stream"], "cpu_ms"),
            "unary_wall_p50_over_raw_ms": _paired(unary, raw["unary"], "wall_p50_ms", 1),
            "token_cpu_over_raw_ms": _paired(stream, raw["stream"], "cpu_ms", tokens),
            "unary_cpu_over_acompletion_ms": _paired(unary, bare["unary"], "cpu_ms", 1),
            "token_cpu_over_acompletion_ms": _paired(stream, bare["stream"], "cpu_ms", tokens),
        }
    return out


def _server_summary(
    unary: list[dict[str, float]],
    stream: list[dict[str, float]],
    raw: Mapping[str, list[dict[str, float]]],
) -> dict[str, float]:
    """The whole RPC above the round's trivial RPC, against the raw client's same round."""
    tokens = _median(raw["stream"], "deltas")  # the upstream's chunks per stream

    def above(rows: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{"cpu_ms": row["cpu_ms"] - row["floor_cpu_ms"]} for row in rows]

    return {
        "unary_cpu_ms": _median(unary, "cpu_ms"),
        "floor_cpu_ms": _median(unary, "floor_cpu_ms"),
        "unary_above_floor_ms": _median(above(unary), "cpu_ms"),
        "stream_cpu_ms": _median(stream, "cpu_ms"),
        "stream_floor_cpu_ms": _median(stream, "floor_cpu_ms"),
        "stream_above_floor_ms": _median(above(stream), "cpu_ms"),
        "chunk_above_floor_ms": _median(above(stream), "cpu_ms") / tokens,
        "messages_per_stream": _median(stream, "deltas"),
        "unary_wall_p50_ms": _median(unary, "wall_p50_ms"),
        "unary_ratio_to_raw": _ratio(above(unary), raw["unary"], "cpu_ms"),
        "chunk_ratio_to_raw": _ratio(above(stream), raw["stream"], "cpu_ms"),
    }


def _server_pairs(workers: Sequence[Worker]) -> dict[str, dict[str, float]]:
    """Each other server against this checkout's, round by round (both ran in every round):
    the median of the paired differences above the floor, this one minus the other."""
    servers = [w for w in workers if "floor_cpu_ms" in w.results["unary"][0]]
    ours = next((w for w in servers if w.kind == "server"), None)
    pairs: dict[str, dict[str, float]] = {}
    for other in servers:
        if ours is None or other is ours:
            continue
        pair = {}
        for mode in ("unary", "stream"):
            pair[f"{mode}_above_floor_ms"] = statistics.median(
                (a["cpu_ms"] - a["floor_cpu_ms"]) - (b["cpu_ms"] - b["floor_cpu_ms"])
                for a, b in zip(ours.results[mode], other.results[mode], strict=True)
            )
        pairs[other.kind] = pair
        print(
            f"server - {other.kind}, paired by round, above the floor: Generate "
            f"{pair['unary_above_floor_ms']:+.3f} ms, GenerateStream "
            f"{pair['stream_above_floor_ms']:+.3f} ms a stream"
        )
    return pairs


def _print_servers(summary: Mapping[str, Mapping[str, float]]) -> None:
    raw = summary["raw"]
    print(
        f"\nthe whole RPC (server CPU, all threads) above ListPromptVersions, against raw "
        f"({raw['unary_cpu_ms']:.3f} ms per call, {raw['cpu_ms_per_token']:.4f} ms per chunk):"
    )
    for name, row in summary.items():
        if "floor_cpu_ms" not in row:
            continue
        print(
            f"{name}: Generate {row['unary_cpu_ms']:.3f} ms, floor {row['floor_cpu_ms']:.3f}, "
            f"above {row['unary_above_floor_ms']:.3f} ({row['unary_ratio_to_raw']:.2f}x raw, "
            f"target <= {SERVER_TARGETS['unary_ratio']}x); GenerateStream "
            f"{row['stream_cpu_ms']:.3f} ms ({row['messages_per_stream']:.0f} messages), per "
            f"chunk above the floor {row['chunk_above_floor_ms']:.4f} "
            f"({row['chunk_ratio_to_raw']:.2f}x raw, target <= {SERVER_TARGETS['chunk_ratio']}x)"
        )


def _print(summary: Mapping[str, Mapping[str, float]], opts: argparse.Namespace) -> None:
    print(
        f"\nmedian of {opts.rounds} rounds; {opts.calls} unary calls and {opts.streams} streams of "
        f"~{summary['raw']['tokens_per_stream']:.0f} tokens per worker per round\n"
    )
    cols = (
        ("unary CPU ms", "unary_cpu_ms", 13),
        ("- raw", "unary_cpu_over_raw_ms", 8),
        ("wall p50 ms", "unary_wall_p50_ms", 12),
        ("- raw", "unary_wall_p50_over_raw_ms", 8),
        ("calls/CPU-s", "calls_per_cpu_second", 12),
        ("stream CPU ms", "stream_cpu_ms", 14),
        ("ms/token", "cpu_ms_per_token", 9),
        ("- raw", "token_cpu_over_raw_ms", 8),
        ("call/raw", "unary_cpu_ratio_to_raw", 9),
        ("chunk/raw", "token_cpu_ratio_to_raw", 10),
    )
    print(f"{'worker':12s}" + "".join(f"{name:>{width}s}" for name, _, width in cols))
    for kind, row in summary.items():
        if "floor_cpu_ms" in row:
            continue  # the server rows: _print_servers
        print(f"{kind:12s}" + "".join(f"{row[key]:>{width}.2f}" for _, key, width in cols))
    print()
    for name, row in summary.items():
        if name not in ("raw", "raw_httpx", "acompletion") and "floor_cpu_ms" not in row:
            print(
                f"{name} - bare litellm.acompletion: {row['unary_cpu_over_acompletion_ms']:+.2f} "
                f"ms CPU per unary call, {row['token_cpu_over_acompletion_ms']:+.3f} per token"
            )
    for name in ("gateway", "gateway_httpx"):
        if name in summary:
            print(f"{name} against issue 14's targets: " + "; ".join(_verdicts(summary[name])))
    if any("floor_cpu_ms" in row for row in summary.values()):
        _print_servers(summary)


def _verdicts(row: Mapping[str, float]) -> list[str]:
    checks = (
        ("CPU per call", row["unary_cpu_ms"], TARGETS["unary_cpu_ms"], "ms"),
        ("call / raw", row["unary_cpu_ratio_to_raw"], TARGETS["unary_ratio"], "x"),
        ("CPU per chunk", row["cpu_ms_per_token"], TARGETS["chunk_cpu_ms"], "ms"),
        ("chunk / raw", row["token_cpu_ratio_to_raw"], TARGETS["chunk_ratio"], "x"),
    )
    return [
        f"{name} {value:.3f} {unit} {'<=' if value <= limit else '>'} {limit} "
        f"({'PASS' if value <= limit else 'FAIL'})"
        for name, value, limit, unit in checks
    ]


def _count_calls(
    port: int, opts: argparse.Namespace, named: Mapping[str, Path | None]
) -> dict[str, dict[str, float]]:
    """Python calls per unary call and per streamed token, one counting worker at a time."""
    counts: dict[str, dict[str, float]] = {}
    for name, llm in named.items():
        worker = _start_worker(name, port, opts, llm, count=True)
        try:
            worker.ask("unary", 20)
            worker.ask("stream", 5)
        finally:
            worker.proc.kill()
            worker.proc.wait()
        stream = worker.results["stream"][0]
        counts[name] = {
            "per_unary_call": worker.results["unary"][0]["py_calls"],
            "per_token": stream["py_calls"] / stream["deltas"],
        }
    raw = counts["raw"]
    print(f"\nPython function calls (all threads){'per unary call':>20s}{'- raw':>9s}", end="")
    print(f"{'per token':>12s}{'- raw':>9s}")
    for name, row in counts.items():
        unary, token = row["per_unary_call"], row["per_token"]
        print(f"{name:35s}{unary:>20.0f}{unary - raw['per_unary_call']:>9.0f}", end="")
        print(f"{token:>12.0f}{token - raw['per_token']:>9.0f}")
    return counts


def _options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=100, help="unary calls per worker per round")
    parser.add_argument("--streams", type=int, default=20, help="streams per worker per round")
    parser.add_argument("--warmup", type=int, default=20, help="calls of each kind first")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per fake completion")
    parser.add_argument("--deadline-s", type=float, default=10.0, help="the simulated deadline")
    parser.add_argument("--model", help=f"the route's model string (default {MODEL})")
    parser.add_argument(
        "--upstream", choices=("openai", "anthropic"), default="openai",
        help="the fake upstream's format (anthropic: the model defaults to an anthropic/ one)",
    )  # fmt: skip
    parser.add_argument("--coalesce-s", type=float, default=0.0, help="the gateway's window")
    parser.add_argument(
        "--baseline-llm", type=Path, action="append", default=[],
        help="another llm.py to measure as well (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--count-calls", action="store_true",
        help="also count Python calls per call (noise-free; extra workers after the rounds)",
    )  # fmt: skip
    parser.add_argument(
        "--server", action="store_true",
        help="also measure the whole RPC on a server from this checkout (see the docstring)",
    )  # fmt: skip
    parser.add_argument(
        "--server-checkout", type=Path, action="append", default=[],
        help="with --server: another checkout's server too, named server_<dir> (repeatable)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the summary and every round here")
    # Internal: the processes this script starts.
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--llm-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--token-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--checkout", type=Path, default=ROOT, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.model = opts.model or (ANTHROPIC_MODEL if opts.upstream == "anthropic" else MODEL)
    return opts


def _start_upstream(opts: argparse.Namespace) -> tuple[subprocess.Popen[str], int]:
    """The fake upstream's process and its port."""
    log = tempfile.NamedTemporaryFile("w+", prefix="llm_overhead_upstream_", suffix=".log")
    upstream = _spawn(
        ["--serve-upstream", "--tokens", str(opts.tokens), "--upstream", opts.upstream], log
    )
    log.close()  # the child holds its own descriptor
    assert upstream.stdout is not None
    line = upstream.stdout.readline()
    if not line.strip():
        _stop_process(upstream)
        raise SystemExit("the fake upstream did not start")
    return upstream, int(line)


def _rounds(
    workers: Sequence[Worker], rounds: int, calls: int, streams: int, log: Callable[[str], None]
) -> None:
    """Each worker in turn, the order rotating every round (see the docstring)."""
    for r in range(rounds):
        order = [*workers[r % len(workers) :], *workers[: r % len(workers)]]
        for w in order:
            w.ask("unary", calls)
            w.ask("stream", streams)
        done = ", ".join(f"{w.kind} {w.results['unary'][-1]['cpu_ms']:.2f}" for w in workers)
        log(f"round {r + 1}/{rounds}: unary CPU ms/call {done}")


def whole_rpc(
    *,
    rounds: int = 5,
    calls: int = 100,
    streams: int = 20,
    warmup: int = 20,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """What --server measures, with only the two workers it needs: the raw aiohttp client and
    a server from this checkout, in interleaved rounds against one fake upstream (the bench's
    generate_overhead scenario). Returns the server's summary (``_server_summary``), the raw
    client's CPU per unary call and per chunk, the settings and every round."""
    opts = _options(
        ["--rounds", str(rounds), "--calls", str(calls), "--streams", str(streams)]
        + ["--warmup", str(warmup)]
    )
    upstream, port = _start_upstream(opts)
    workers: list[Worker] = []
    try:
        workers.append(_start_worker("raw", port, opts, None))
        workers.append(_start_worker("server", port, opts, None, checkout=ROOT.resolve()))
        _rounds(workers, rounds, calls, streams, log)
    finally:
        for w in workers:
            w.stop()
        _stop_process(upstream)
    raw, server = workers[0].results, workers[1].results
    chunks = _median(raw["stream"], "deltas")
    return {
        "server": _server_summary(server["unary"], server["stream"], raw),
        "raw": {
            "unary_cpu_ms": _median(raw["unary"], "cpu_ms"),
            "unary_wall_p50_ms": _median(raw["unary"], "wall_p50_ms"),
            "stream_cpu_ms": _median(raw["stream"], "cpu_ms"),
            "chunks_per_stream": chunks,
            "cpu_ms_per_chunk": _median(raw["stream"], "cpu_ms") / chunks,
        },
        "settings": {
            "rounds": rounds,
            "calls": calls,
            "streams": streams,
            "warmup": warmup,
            "tokens": opts.tokens,
            "model": opts.model,
            "upstream": opts.upstream,
        },
        "rounds": {w.kind: w.results for w in workers},
    }


def main(argv: Sequence[str] | None = None) -> None:
    opts = _options(argv)

    if opts.serve_upstream:
        asyncio.run(_serve_upstream(opts.tokens, opts.upstream, opts.token_delay_s))
        return
    if opts.worker:
        if opts.count_calls:
            global _counter
            _counter = _CallCounter()
            _counter.install()
        asyncio.run(
            _worker(
                opts.worker, opts.port, opts.warmup, opts.llm_file, opts.deadline_s, opts.model,
                opts.upstream, opts.coalesce_s, opts.checkout,
            )
        )  # fmt: skip
        return

    upstream, port = _start_upstream(opts)
    workers: list[Worker] = []
    try:
        named: dict[str, Path | None] = {
            kind: None for kind in ("raw", "raw_httpx", "acompletion", "gateway", "gateway_httpx")
        }
        named.update({path.stem: path for path in opts.baseline_llm})
        if len(named) != 5 + len(opts.baseline_llm):
            raise SystemExit("--baseline-llm files need distinct names, other than the workers'")
        print(f"fake upstream on 127.0.0.1:{port}; starting workers: {', '.join(named)}")
        workers = [_start_worker(name, port, opts, llm) for name, llm in named.items()]
        if opts.server:
            servers = {"server": ROOT.resolve()}
            servers.update(
                {f"server_{p.resolve().name}": p.resolve() for p in opts.server_checkout}
            )
            for name, checkout in servers.items():
                workers.append(_start_worker(name, port, opts, None, checkout=checkout))
                workers[-1].kind = name
        _rounds(
            workers, opts.rounds, opts.calls, opts.streams, lambda line: print(line, flush=True)
        )
        summary = _summary(workers)
        _print(summary, opts)
        pairs = _server_pairs(workers)
        counts = _count_calls(port, opts, named) if opts.count_calls else {}
        if opts.json:
            rounds = {w.kind: w.results for w in workers}
            report = {
                "summary": summary,
                "server_pairs": pairs,
                "rounds": rounds,
                "python_calls": counts,
            }
            opts.json.write_text(json.dumps(report, indent=2))
    finally:
        for w in workers:
            w.stop()
        _stop_process(upstream)


if __name__ == "__main__":
    main()
