"""The one pooled async HTTP client per process that the provider path sends LLM requests on.

Two implementations behind one small seam, both measured (scripts/llm_overhead.py): aiohttp
(the default: ~3x less CPU per request and per streamed chunk than httpx here) and httpx. Each
keeps connections alive per host, with the pool sized from the server's concurrency limit so
that no admitted RPC waits silently for a connection. Timeouts are the caller's (asyncio.timeout
around each try, in the gateway); a cancelled or abandoned request closes its connection at
once rather than returning it to the pool half read, so the upstream sees the hang-up.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
import httpx

CLIENTS = ("aiohttp", "httpx")
"""The values of ML_SERVING_LLM_HTTP_CLIENT."""

MAX_ANSWER_BYTES = 16 * 1024 * 1024
"""Most bytes read of one upstream answer, a stream's included: an answer of max_tokens (1024 at
most by default) is a few hundred KB even as SSE. A 50 MB body was read whole, then refused by
gRPC's send limit while our logs said OK; past this the answer is an upstream failure."""


def _too_large(read: int) -> TransportError:
    return TransportError(f"the answer is larger than {MAX_ANSWER_BYTES} bytes ({read} read)")


class TransportError(Exception):
    """The request could not be sent or its answer not read (refused, reset, cut short)."""


class Response(Protocol):
    """One upstream answer: status and headers first, then the body, read once."""

    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes:
        """The whole body; releases the connection to the pool."""
        ...

    def text_chunks(self) -> AsyncIterator[str]:
        """The body as decoded text, as it arrives (for SSE)."""
        ...

    async def close(self) -> None:
        """Done with it: a fully read connection goes back to the pool, any other is closed."""
        ...


class HttpClient(Protocol):
    """A pooled client: POST a JSON body, get a Response once the headers are in."""

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Send; raises TransportError when no answer starts."""
        ...

    async def aclose(self) -> None:
        """Close every pooled connection."""
        ...


def make_client(kind: str, *, max_connections: int, keepalive_s: float) -> HttpClient:
    """The pooled client named by ML_SERVING_LLM_HTTP_CLIENT ("aiohttp" or "httpx")."""
    if kind == "aiohttp":
        return AiohttpClient(max_connections=max_connections, keepalive_s=keepalive_s)
    if kind == "httpx":
        return HttpxClient(max_connections=max_connections, keepalive_s=keepalive_s)
    raise ValueError(f"unknown LLM HTTP client {kind!r}; known: {', '.join(CLIENTS)}")


def _decoded(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """UTF-8 text from byte chunks that may split a character (SSE bodies are UTF-8)."""

    async def text() -> AsyncIterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for data in chunks:
            piece = decoder.decode(data)
            if piece:
                yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    return text()


# --- aiohttp -------------------------------------------------------------------------------------


class _AiohttpResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        response = self._response
        whole = False
        try:
            length = response.content_length
            if length is not None and length > MAX_ANSWER_BYTES:
                raise _too_large(0)
            chunks: list[bytes] = []
            read = 0
            async for data in response.content.iter_any():
                read += len(data)
                if read > MAX_ANSWER_BYTES:
                    raise _too_large(read)
                chunks.append(data)
            whole = True
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except aiohttp.ClientError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if whole:
                response.release()
            else:
                response.close()  # half read: the connection cannot go back to the pool

    async def text_chunks(self) -> AsyncIterator[str]:
        content = self._response.content
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        read = 0
        try:
            # readany returns whatever has arrived (several SSE events at once when the loop
            # was busy), so one pass handles them all.
            while data := await content.readany():
                read += len(data)
                if read > MAX_ANSWER_BYTES:
                    raise _too_large(read)
                if text := decoder.decode(data):
                    yield text
        except aiohttp.ClientError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        if tail := decoder.decode(b"", final=True):
            yield tail

    async def close(self) -> None:
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpClient:
    """aiohttp.ClientSession with a TCPConnector sized from the server's concurrency limit."""

    def __init__(self, *, max_connections: int, keepalive_s: float) -> None:
        self._max = max_connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

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

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> Response:
        session = self._session or self._open()
        try:
            response = await session.post(url, data=body, headers=headers)
        except aiohttp.ClientError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- httpx ---------------------------------------------------------------------------------------


class _HttpxResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        chunks: list[bytes] = []
        read = 0
        try:
            async for data in self._response.aiter_bytes():
                read += len(data)
                if read > MAX_ANSWER_BYTES:
                    raise _too_large(read)
                chunks.append(data)
            return b"".join(chunks)
        except httpx.TransportError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            await self._response.aclose()

    def text_chunks(self) -> AsyncIterator[str]:
        return _decoded(self._chunks())

    async def _chunks(self) -> AsyncIterator[bytes]:
        read = 0
        try:
            async for data in self._response.aiter_bytes():
                read += len(data)
                if read > MAX_ANSWER_BYTES:
                    raise _too_large(read)
                yield data
        except httpx.TransportError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._response.aclose()


class HttpxClient:
    """httpx.AsyncClient with its pool sized from the server's concurrency limit."""

    def __init__(self, *, max_connections: int, keepalive_s: float) -> None:
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=keepalive_s,
            ),
            timeout=httpx.Timeout(None),
        )

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> Response:
        request = self._client.build_request("POST", url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        await self._client.aclose()
