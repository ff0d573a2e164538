"""The load generator: grpc.aio (and aiohttp, for the direct-upstream baseline) closed-loop
clients, run in-process or split over several client processes started once and reused."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import multiprocessing
import random
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.message import Message

from bench.scenarios import CallSpec, method_path, resolve_method

WARMUP_CALLS = 20
"""Unrecorded calls per client process before the clock starts (connection, lazy imports)."""
REQUEST_NUMBER = "{{.RequestNumber}}"


@dataclass(frozen=True)
class GrpcJob:
    """A closed loop of gRPC calls: `concurrency` callers, until `total` calls or `duration_s`."""

    target: str
    specs: tuple[CallSpec, ...]
    weights: tuple[float, ...]
    concurrency: int
    total: int
    duration_s: float
    warmup_calls: int = WARMUP_CALLS
    seed: int = 0
    request_offset: int = 0
    """First {{.RequestNumber}} of this process (numbers stay unique across processes)."""
    connections: int = 1
    """Connections per client process (ghz's --connections); calls go round-robin over them.
    A server with worker processes needs several: the kernel balances connections, not calls."""


@dataclass(frozen=True)
class HttpJob:
    """The direct baseline: the same closed loop against an OpenAI-compatible upstream."""

    url: str
    body: dict[str, Any]
    concurrency: int
    total: int
    duration_s: float
    timeout_s: float = 10.0
    headers: tuple[tuple[str, str], ...] = ()
    label: str = "direct"
    warmup_calls: int = WARMUP_CALLS
    seed: int = 0
    request_offset: int = 0


Job = GrpcJob | HttpJob


@dataclass
class Samples:
    """What one label's calls measured; latencies in seconds, successful calls only."""

    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    """Streams: time to the first message."""
    gap: list[float] = field(default_factory=list)
    """Streams: mean time between text deltas, one value per stream."""
    messages: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Failed calls by gRPC status name (or FALLBACK, INCOMPLETE_STREAM, HTTP_nnn, exception)."""

    def merge(self, other: Samples) -> None:
        self.latency += other.latency
        self.ttft += other.ttft
        self.gap += other.gap
        self.messages += other.messages
        self.ok += other.ok
        self.errors.update(other.errors)


@dataclass
class JobResult:
    """One client process's (or the merged) outcome of a job."""

    samples: dict[str, Samples]
    started: float
    """Wall clock (time.time) when the first call started."""
    finished: float
    """Wall clock when the last call finished."""
    client_cpu_s: float = 0.0
    """CPU seconds the client process(es) used during the run."""
    late_s: float = 0.0
    """How late the latest client process started after the agreed start time."""
    processes: int = 1
    unreachable: int = 0
    """Client processes that could not connect to the target before the run."""

    @property
    def wall_s(self) -> float:
        return max(self.finished - self.started, 1e-9)


def merge_results(results: Sequence[JobResult]) -> JobResult:
    """Combine the per-process results of one job."""
    samples: dict[str, Samples] = {}
    for result in results:
        for label, s in result.samples.items():
            samples.setdefault(label, Samples()).merge(s)
    return JobResult(
        samples=samples,
        started=min(r.started for r in results),
        finished=max(r.finished for r in results),
        client_cpu_s=sum(r.client_cpu_s for r in results),
        late_s=max(r.late_s for r in results),
        processes=sum(r.processes for r in results),
        unreachable=sum(r.unreachable for r in results),
    )


def concat_results(results: Sequence[JobResult]) -> JobResult:
    """Combine the results of one job run several times in a row (rounds): the wall time is
    the sum of the runs' wall times."""
    merged = merge_results(results)
    merged.started = results[0].started
    merged.finished = merged.started + sum(r.wall_s for r in results)
    merged.processes = results[0].processes
    return merged


def summarize(values_s: Sequence[float]) -> dict[str, float] | None:
    """p50/p90/p99/max/mean in milliseconds (nearest-rank percentiles); None when empty."""
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99], method="inverted_cdf")
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(ms.max()), 3),
        "mean": round(float(ms.mean()), 3),
    }


def split_job(job: Job, parts: int) -> list[Job]:
    """Share a job's concurrency and total among `parts` client processes."""
    parts = max(1, min(parts, job.concurrency))
    out: list[Job] = []
    offset = 0
    for i in range(parts):
        concurrency = job.concurrency // parts + (1 if i < job.concurrency % parts else 0)
        total = job.total // parts + (1 if i < job.total % parts else 0)
        out.append(
            replace(
                job,
                concurrency=concurrency,
                total=max(total, 1),
                seed=job.seed * 1000 + i,
                request_offset=job.request_offset + offset,
                warmup_calls=max(1, job.warmup_calls // parts),
            )
        )
        offset += total
    return out


# --- gRPC --------------------------------------------------------------------------------------


class _GrpcCaller:
    """Resolves a CallSpec and makes one call of it, recording into Samples."""

    def __init__(self, channel: grpc.aio.Channel, spec: CallSpec) -> None:
        method = resolve_method(spec.call)
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = (
            request_cls if spec.echo else message_factory.GetMessageClass(method.output_type)
        )
        self.spec = spec
        self.samples = Samples()
        self._streaming = method.server_streaming
        self._has_end = "end" in response_cls.DESCRIPTOR.fields_by_name
        self._has_fallback = "fallback" in response_cls.DESCRIPTOR.fields_by_name
        self._templated = any(REQUEST_NUMBER in v for _, v in spec.metadata)
        path = method_path(method)
        # The request is serialized once (request_serializer=None sends bytes as they are);
        # responses are parsed, as any real client does.
        self._stream: Any = None
        self._unary: Any = None
        if self._streaming:
            self._stream = channel.unary_stream(path, response_deserializer=response_cls.FromString)
        else:
            self._unary = channel.unary_unary(path, response_deserializer=response_cls.FromString)

    def _metadata(self, number: int) -> tuple[tuple[str, str], ...]:
        if not self._templated:
            return self.spec.metadata
        n = str(number)
        return tuple((k, v.replace(REQUEST_NUMBER, n)) for k, v in self.spec.metadata)

    async def call(self, number: int, record: bool = True) -> None:
        spec, s = self.spec, self.samples
        started = time.perf_counter()
        try:
            if self._streaming:
                outcome = await self._call_stream(number, started, record)
            else:
                response = await self._unary(
                    spec.request, timeout=spec.timeout_s, metadata=self._metadata(number)
                )
                outcome = self._check(response)
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code().name
        except Exception as exc:  # a client-side failure is a failure too, never a success
            outcome = type(exc).__name__
        if not record:
            return
        if outcome is None:
            s.ok += 1
            s.latency.append(time.perf_counter() - started)
        else:
            s.errors[outcome] += 1

    async def _call_stream(self, number: int, started: float, record: bool) -> str | None:
        times: list[float] = []
        last: Message | None = None
        call = self._stream(
            self.spec.request, timeout=self.spec.timeout_s, metadata=self._metadata(number)
        )
        async for message in call:
            times.append(time.perf_counter())
            last = message
        if last is None:
            return "EMPTY_STREAM"
        outcome = self._check(last)
        if outcome is None and record:
            s = self.samples
            s.messages += len(times)
            s.ttft.append(times[0] - started)
            deltas = times[:-1] if self._has_end else times  # the end message carries no text
            if len(deltas) >= 2:
                s.gap.append((deltas[-1] - deltas[0]) / (len(deltas) - 1))
        return outcome

    def _check(self, response: Message) -> str | None:
        """None when the response is a full success; a failure label otherwise."""
        if self._has_end:
            if not response.HasField("end"):
                return "INCOMPLETE_STREAM"
            response = response.end  # type: ignore[attr-defined]
        if self._has_fallback and response.fallback:  # type: ignore[attr-defined]
            return "FALLBACK"  # degraded mode answered: the LLM path did not
        return None


class _HttpCaller:
    """One direct call to the OpenAI-compatible upstream (aiohttp), recording into Samples."""

    def __init__(self, session: Any, job: HttpJob) -> None:
        self.job = job
        self.samples = Samples()
        self._session = session
        self._body = json.dumps(job.body).encode()
        self._headers = {"Content-Type": "application/json", **dict(job.headers)}
        self._stream = bool(job.body.get("stream"))

    async def call(self, number: int, record: bool = True) -> None:
        import aiohttp

        s = self.samples
        started = time.perf_counter()
        times: list[float] = []
        outcome: str | None = None
        try:
            async with self._session.post(
                self.job.url,
                data=self._body,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.job.timeout_s),
            ) as response:
                if response.status != 200:
                    outcome = f"HTTP_{response.status}"
                    await response.read()
                elif self._stream:
                    done = False
                    async for line in response.content:
                        if not line.startswith(b"data: "):
                            continue
                        payload = line[6:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        chunk = json.loads(payload)
                        choices = chunk.get("choices") or ()
                        if choices and choices[0].get("delta", {}).get("content"):
                            times.append(time.perf_counter())
                    if not done:
                        outcome = "INCOMPLETE_STREAM"
                else:
                    body = json.loads(await response.read())
                    if not body["choices"][0]["message"]["content"]:
                        outcome = "EMPTY"
        except TimeoutError:
            outcome = "DEADLINE_EXCEEDED"
        except Exception as exc:
            outcome = type(exc).__name__
        if not record:
            return
        if outcome is not None:
            s.errors[outcome] += 1
            return
        s.ok += 1
        s.latency.append(time.perf_counter() - started)
        if times:
            s.messages += len(times)
            s.ttft.append(times[0] - started)
            if len(times) >= 2:
                s.gap.append((times[-1] - times[0]) / (len(times) - 1))


async def _drive(
    concurrency: int,
    total: int,
    duration_s: float,
    one: Callable[[int], Awaitable[None]],
    first_number: int = 0,
) -> tuple[float, float]:
    """`concurrency` callers take call numbers until `total` or `duration_s`; in-flight calls
    finish. Returns the wall-clock (start, end)."""
    counter = itertools.count()
    stop_at = time.perf_counter() + duration_s

    async def caller() -> None:
        while True:
            n = next(counter)
            if n >= total or time.perf_counter() >= stop_at:
                return
            await one(first_number + n)

    started = time.time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return started, time.time()


class Load:
    """A job ready to run: set up (channel or HTTP session, warm-up) then run once."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._channels: list[grpc.aio.Channel] = []
        self._session: Any = None
        self._callers: list[_GrpcCaller] | list[_HttpCaller] = []
        self._connections = 1
        self._cumulative: list[float] = []
        self.unreachable = False
        """No connection within 15 s of setting up (the target was wedged or gone)."""

    async def setup(self) -> None:
        job = self.job
        if isinstance(job, GrpcJob):
            # A local subchannel pool per channel: otherwise channels to one target share a
            # single connection.
            options = [("grpc.use_local_subchannel_pool", 1)] if job.connections > 1 else []
            self._connections = max(1, job.connections)
            self._channels = [
                grpc.aio.insecure_channel(job.target, options=options)
                for _ in range(self._connections)
            ]
            await self._wait_ready(15)
            # Callers laid out channel-major: the callers of channel i are a block of len(specs).
            self._callers = [
                _GrpcCaller(channel, spec) for channel in self._channels for spec in job.specs
            ]
            weights = job.weights or (1.0,) * len(job.specs)
        else:
            import aiohttp

            # No pool limit: the baseline client opens as many connections as it has callers.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            self._callers = [_HttpCaller(self._session, job)]
            weights = (1.0,)
        self._cumulative = list(itertools.accumulate(weights))
        rng = random.Random(job.seed)
        warm = min(job.warmup_calls, job.total)
        if warm:

            async def warm_one(n: int) -> None:
                await self._pick(rng, n).call(n, record=False)

            # Every connection gets warmed (at least one call each).
            warm = max(warm, self._connections)
            await _drive(min(8, job.concurrency), warm, 30.0, warm_one, first_number=-warm)

    async def _wait_ready(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(channel.channel_ready() for channel in self._channels)),
                timeout_s,
            )
            self.unreachable = False
        except TimeoutError:
            # Go on: the calls then fail (UNAVAILABLE, DEADLINE_EXCEEDED) and are counted as
            # the errors they are, rather than the whole bench stopping here.
            self.unreachable = True

    def _pick(self, rng: random.Random, number: int) -> _GrpcCaller | _HttpCaller:
        per_channel = len(self._cumulative)
        base = (number % self._connections) * per_channel
        if per_channel == 1:
            return self._callers[base]
        x = rng.random() * self._cumulative[-1]
        return self._callers[base + bisect.bisect_right(self._cumulative, x)]

    async def run(self, start_at: float | None = None) -> JobResult:
        job = self.job
        late = 0.0
        if start_at is not None:
            wait = start_at - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            late = max(0.0, time.time() - start_at)
        rng = random.Random(job.seed + 1)

        async def one(n: int) -> None:
            await self._pick(rng, n).call(n)

        if self.unreachable and self._channels:
            # One more chance: the server may have come back while the others warmed up.
            await self._wait_ready(5)
        cpu0 = time.process_time()
        started, finished = await _drive(
            job.concurrency, job.total, job.duration_s, one, job.request_offset
        )
        cpu = time.process_time() - cpu0
        samples: dict[str, Samples] = {}
        for caller in self._callers:
            label = caller.spec.label if isinstance(caller, _GrpcCaller) else caller.job.label
            samples.setdefault(label, Samples()).merge(caller.samples)
        return JobResult(
            samples,
            started,
            finished,
            client_cpu_s=cpu,
            late_s=late,
            unreachable=int(self.unreachable),
        )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        if self._session is not None:
            await self._session.close()


async def run_job(job: Job) -> JobResult:
    """Set up, warm up and run a job in this process and event loop (tests, --clients 1)."""
    load = Load(job)
    try:
        await load.setup()
        return await load.run()
    finally:
        await load.close()


# --- client processes --------------------------------------------------------------------------


def _client_main(conn: Connection, use_uvloop: bool) -> None:
    """A client process: for each job, set up and warm up, report ready, wait for the common
    start time, run, send the result back."""
    if use_uvloop:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    while True:
        job = conn.recv()
        if job is None:
            break
        load = Load(job)
        try:
            loop.run_until_complete(load.setup())
            conn.send(("ready", None))
            start_at = conn.recv()
            if start_at is None:  # the bench gave up on this job (another process failed)
                break
            result = loop.run_until_complete(load.run(start_at))
            conn.send(("done", result))
        except Exception:
            conn.send(("error", traceback.format_exc()))
        finally:
            loop.run_until_complete(load.close())
    loop.close()


class ClientPool:
    """Client processes (spawned once, reused for every run) that split each job among them."""

    def __init__(self, processes: int, use_uvloop: bool = True) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_client_main, args=(child, use_uvloop), name=f"bench-client-{i}"
            )
            proc.daemon = True
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def size(self) -> int:
        return len(self._procs)

    def run(
        self,
        job: Job,
        processes: int,
        ready_timeout_s: float = 120.0,
        before_start: Callable[[], None] | None = None,
    ) -> JobResult:
        """Run `job` split over `processes` of the pool's client processes, started together;
        `before_start` runs once they are warm, just before the clock starts."""
        parts = split_job(job, min(processes, self.size))
        conns = self._conns[: len(parts)]
        for conn, part in zip(conns, parts, strict=True):
            conn.send(part)
        for conn in conns:
            self._expect(conn, "ready", ready_timeout_s)
        if before_start is not None:
            before_start()
        start_at = time.time() + 0.2
        for conn in conns:
            conn.send(start_at)
        limit = job.duration_s + 120.0
        results = [self._expect(conn, "done", limit) for conn in conns]
        return merge_results(results)

    def _expect(self, conn: Connection, kind: str, timeout_s: float) -> Any:
        if not conn.poll(timeout_s):
            raise TimeoutError(f"client process did not report {kind!r} within {timeout_s:.0f}s")
        got, payload = conn.recv()
        if got == "error":
            raise RuntimeError(f"client process failed:\n{payload}")
        if got != kind:
            raise RuntimeError(f"client process sent {got!r}, expected {kind!r}")
        return payload

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
