"""The one pooled async HTTP client per process that the provider path sends LLM requests on.

Two implementations behind one small seam, both measured (scripts/llm_overhead.py): aiohttp
(the default: ~3x less CPU per request and per streamed chunk than httpx here) and httpx. Each
keeps connections alive per host, with the pool sized from the server's concurrency limit so
that no admitted RPC waits silently for a connection. Timeouts are the caller's (asyncio.timeout
around each try, in the gateway); a cancelled or abandoned request closes its connection at
once rather than returning it to the pool half read, so the upstream sees the hang-up.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import ctypes.util
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

import aiohttp
import httpx

from ml_serving import errors

CLIENTS = ("aiohttp", "httpx")
"""The values of ML_SERVING_LLM_HTTP_CLIENT."""

MAX_ANSWER_BYTES = 16 * 1024 * 1024
"""Ceiling on the bytes read of one upstream answer, whatever its request allows: the bound a
call passes (`post`'s max_bytes, from its max_tokens and the provider's framing) is lower."""

DEFAULT_BUDGET_BYTES = 64 * 1024 * 1024
"""ML_SERVING_LLM_ANSWER_BUDGET_BYTES' default (the setting's docstring says why)."""


class TransportError(Exception):
    """The request could not be sent or its answer not read (refused, reset, cut short)."""


class AnswerTooLarge(TransportError):
    """The answer ran past the bound its request allows: an upstream failure, refused while it
    is read (never after)."""


def _too_large(read: int, bound: int) -> AnswerTooLarge:
    return AnswerTooLarge(f"the answer is larger than its request allows ({read} > {bound} bytes)")


TRIM_AFTER_BYTES = 4 * 1024 * 1024
"""Once this much was held since the last trim and nothing is held any more, the heap's free
pages go back to the system (`_trim`)."""
_TRIM_EVERY_S = 2.0


def _libc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    return None if trim is None else trim


_malloc_trim = _libc_trim()


class AnswerBudget:
    """Bytes of upstream answers held at once, summed over every call of the process.

    Each answer is bounded on its own, but 2,048 calls in flight at 16 MiB each is 32 GiB: this
    is the bound on the sum. A piece that would take the total past `limit` is not kept, and
    its call fails with errors.AnswerBudgetSpent (UNAVAILABLE, or the fallback tip).
    """

    __slots__ = (
        "_since_trim",
        "_trim_timer",
        "_trimmed_at",
        "held",
        "limit",
        "peak",
        "refused",
        "trims",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.refused = 0
        """Answers given up because the budget was spent."""
        self.trims = 0
        """Times the heap was trimmed after a burst."""
        self._since_trim = 0
        self._trimmed_at = 0.0
        self._trim_timer: asyncio.TimerHandle | None = None

    def take(self, n: int) -> None:
        """Hold `n` more bytes, or raise AnswerBudgetSpent (nothing held then)."""
        held = self.held + n
        if n > 0 and held > self.limit:
            self.refused += 1
            raise errors.AnswerBudgetSpent(
                "the server is holding too many upstream answers at once; retry shortly"
            )
        self.held = held
        self._since_trim += n
        if held > self.peak:
            self.peak = held

    def give(self, n: int) -> None:
        """Return `n` bytes taken before; after a burst, the memory it took goes back."""
        self.held -= n
        if self.held == 0 and self._since_trim >= TRIM_AFTER_BYTES:
            self._trim()

    def _trim(self) -> None:
        # Answers arrive in pieces of up to 64 KiB, below glibc's mmap threshold: freed, they
        # stay in the heap and the process keeps its peak (a wave of 64 such answers left RSS
        # 1 GB up 10 s later). malloc_trim hands the free pages back; at most every 2 s, the
        # last burst's trim waits for its turn.
        if _malloc_trim is None or self.held or self._since_trim < TRIM_AFTER_BYTES:
            return
        now = time.monotonic()
        wait = self._trimmed_at + _TRIM_EVERY_S - now
        if wait > 0:
            if self._trim_timer is None:
                loop = asyncio.get_running_loop()
                self._trim_timer = loop.call_later(wait, self._timer_fired)
            return
        self._trimmed_at = now
        self._since_trim = 0
        self.trims += 1
        _malloc_trim(0)

    def _timer_fired(self) -> None:
        self._trim_timer = None
        self._trim()


class _Held:
    """What one answer holds of the budget, and the bound on what it may read in all."""

    __slots__ = ("budget", "bound", "held", "read")

    def __init__(self, budget: AnswerBudget, bound: int) -> None:
        self.budget = budget
        self.bound = min(bound, MAX_ANSWER_BYTES)
        self.held = 0
        self.read = 0

    def check_length(self, length: int | None) -> None:
        if length is not None and length > self.bound:
            raise _too_large(length, self.bound)

    def arrived(self, n: int) -> None:
        """`n` more bytes of the answer: within its bound, and held against the budget."""
        self.read += n
        if self.read > self.bound:
            raise _too_large(self.read, self.bound)
        self.budget.take(n)
        self.held += n

    def keep_only(self, n: int) -> None:
        """Of what is held, only `n` bytes stay alive (a stream's unfinished line)."""
        if n < self.held:
            self.budget.give(self.held - n)
            self.held = n

    def free(self) -> None:
        self.keep_only(0)


def _line_tail(data: bytes, pending: int) -> int:
    """Bytes of the SSE line still unfinished after `data` (LiteLLM's splitter keeps them until
    a line break: CR or LF)."""
    cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
    return pending + len(data) if cut < 0 else len(data) - cut - 1


class Response(Protocol):
    """One upstream answer: status and headers first, then the body, read once."""

    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes:
        """The whole body; releases the connection to the pool. Its bytes stay held against
        the budget until `free` (or `close`): the caller parses them first."""
        ...

    def text_chunks(self) -> AsyncIterator[str]:
        """The body as decoded text, as it arrives (for SSE)."""
        ...

    def free(self) -> None:
        """The body read is no longer held: its bytes go back to the budget."""
        ...

    async def close(self) -> None:
        """Done with it: a fully read connection goes back to the pool, any other is closed;
        whatever it held goes back to the budget."""
        ...


class HttpClient(Protocol):
    """A pooled client: POST a JSON body, get a Response once the headers are in."""

    budget: AnswerBudget

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, *, max_bytes: int
    ) -> Response:
        """Send; raises TransportError when no answer starts. The answer may be at most
        `max_bytes` long (AnswerTooLarge past it, while it is read)."""
        ...

    async def aclose(self) -> None:
        """Close every pooled connection."""
        ...


def make_client(
    kind: str,
    *,
    max_connections: int,
    keepalive_s: float,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> HttpClient:
    """The pooled client named by ML_SERVING_LLM_HTTP_CLIENT ("aiohttp" or "httpx"), its
    answers held within `budget_bytes` in all."""
    budget = AnswerBudget(budget_bytes)
    if kind == "aiohttp":
        return AiohttpClient(
            max_connections=max_connections, keepalive_s=keepalive_s, budget=budget
        )
    if kind == "httpx":
        return HttpxClient(max_connections=max_connections, keepalive_s=keepalive_s, budget=budget)
    raise ValueError(f"unknown LLM HTTP client {kind!r}; known: {', '.join(CLIENTS)}")


async def _sse_text(chunks: AsyncIterator[bytes], held: _Held) -> AsyncIterator[str]:
    """UTF-8 text from byte chunks that may split a character (SSE bodies are UTF-8), each
    chunk held against the budget while it is parsed, then only its unfinished line."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = 0
    try:
        async for data in chunks:
            held.arrived(len(data))
            pending = _line_tail(data, pending)
            if piece := decoder.decode(data):
                yield piece
            # The consumer has parsed what it was given: only the unfinished line stays.
            held.keep_only(pending)
        if tail := decoder.decode(b"", final=True):
            yield tail
    finally:
        held.free()


# --- aiohttp -------------------------------------------------------------------------------------


class _AiohttpResponse:
    __slots__ = ("_held", "_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, held: _Held) -> None:
        self._response = response
        self._held = held
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        response = self._response
        held = self._held
        whole = False
        try:
            held.check_length(response.content_length)
            chunks: list[bytes] = []
            async for data in response.content.iter_any():
                held.arrived(len(data))
                chunks.append(data)
            whole = True
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except aiohttp.ClientError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if whole:
                response.release()
            else:
                held.free()
                response.close()  # half read: the connection cannot go back to the pool

    async def _chunks(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            # readany returns whatever has arrived (several SSE events at once when the loop
            # was busy), so one pass handles them all.
            while data := await content.readany():
                yield data
        except aiohttp.ClientError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    def text_chunks(self) -> AsyncIterator[str]:
        self._held.check_length(self._response.content_length)
        return _sse_text(self._chunks(), self._held)

    def free(self) -> None:
        self._held.free()

    async def close(self) -> None:
        self._held.free()
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpClient:
    """aiohttp.ClientSession with a TCPConnector sized from the server's concurrency limit."""

    def __init__(
        self, *, max_connections: int, keepalive_s: float, budget: AnswerBudget | None = None
    ) -> None:
        self._max = max_connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self.budget = budget or AnswerBudget(DEFAULT_BUDGET_BYTES)

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use: a ClientSession belongs to the running event loop.
        connector = aiohttp.TCPConnector(
            limit=self._max, limit_per_host=self._max, keepalive_timeout=self._keepalive_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # The gateway's asyncio.timeout bounds each try; no second timer per request here.
            timeout=aiohttp.ClientTimeout(total=None),
            # LLM answers are JSON or SSE; skip aiohttp's cookie jar work on every response.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
        )
        return self._session

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, *, max_bytes: int
    ) -> Response:
        session = self._session or self._open()
        try:
            response = await session.post(url, data=body, headers=headers)
        except aiohttp.ClientError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return _AiohttpResponse(response, _Held(self.budget, max_bytes))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- httpx ---------------------------------------------------------------------------------------


class _HttpxResponse:
    __slots__ = ("_held", "_response", "headers", "status")

    def __init__(self, response: httpx.Response, held: _Held) -> None:
        self._response = response
        self._held = held
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers

    def _length(self) -> int | None:
        value = self._response.headers.get("content-length", "")
        return int(value) if value.isdigit() else None

    async def read(self) -> bytes:
        held = self._held
        chunks: list[bytes] = []
        whole = False
        try:
            held.check_length(self._length())
            async for data in self._response.aiter_bytes():
                held.arrived(len(data))
                chunks.append(data)
            whole = True
            return b"".join(chunks)
        except httpx.TransportError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not whole:
                held.free()
            await self._response.aclose()

    def text_chunks(self) -> AsyncIterator[str]:
        self._held.check_length(self._length())
        return _sse_text(self._chunks(), self._held)

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._response.aiter_bytes():
                yield data
        except httpx.TransportError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    def free(self) -> None:
        self._held.free()

    async def close(self) -> None:
        self._held.free()
        await self._response.aclose()


class HttpxClient:
    """httpx.AsyncClient with its pool sized from the server's concurrency limit."""

    def __init__(
        self, *, max_connections: int, keepalive_s: float, budget: AnswerBudget | None = None
    ) -> None:
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=keepalive_s,
            ),
            timeout=httpx.Timeout(None),
        )
        self.budget = budget or AnswerBudget(DEFAULT_BUDGET_BYTES)

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, *, max_bytes: int
    ) -> Response:
        request = self._client.build_request("POST", url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return _HttpxResponse(response, _Held(self.budget, max_bytes))

    async def aclose(self) -> None:
        await self._client.aclose()
