"""Hostile clients against a server subprocess: no credential reaches its log, whichever path
writes it (grpc's own logger included), and header bytes it cannot decode cannot flood it."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator

import grpc
import pytest

from ml_serving._proto.mlserving.v1 import inference_service_pb2_grpc as pb_grpc
from tests.support.requests import generate_request, score_request
from tests.support.server_process import ServerProcess

TOKEN = "tok-3f9a1c7e5b2d4068a1b2c3d4e5f60718"
ENV_SECRET = "envsecret-7d41c0a9e8b2f635"
"""A value the server's environment holds under a *_SECRET name."""
SCORE = "/mlserving.v1.InferenceService/Score"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REDACTED = "<redacted>"
HEALTH_SERVING = b"\x00\x00\x00\x00\x02\x08\x01"
"""A gRPC message frame holding HealthCheckResponse(status=SERVING)."""

# --- a minimal HTTP/2 client: the grpc client refuses to send non-ASCII header values ---------


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = bytearray([limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _header(name: bytes, value: bytes) -> bytes:
    # "Literal header field without indexing, new name", no Huffman coding (RFC 7541 6.2.2).
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0, 1, 3, 4, 7
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4


def raw_call(
    port: int, path: str, headers: list[tuple[bytes, bytes]], message: bytes, timeout_s: float = 10
) -> bytes:
    """One unary gRPC call with these exact header bytes; returns the DATA the server sent."""
    block = b"".join(
        _header(name, value)
        for name, value in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", f"127.0.0.1:{port}".encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *headers,
        ]
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(_SETTINGS, 0, 0, b"")
            + _frame(_HEADERS, _END_HEADERS, 1, block)
            + _frame(_DATA, _END_STREAM, 1, body)
        )
        pending = b""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            while len(pending) >= 9 and len(pending) >= 9 + int.from_bytes(pending[:3], "big"):
                length = int.from_bytes(pending[:3], "big")
                kind, flags = pending[3], pending[4]
                stream = int.from_bytes(pending[5:9], "big") & 0x7FFFFFFF
                payload, pending = pending[9 : 9 + length], pending[9 + length :]
                if kind == _SETTINGS and not flags & _ACK:
                    sock.sendall(_frame(_SETTINGS, _ACK, 0, b""))
                if stream == 1 and kind == _DATA:
                    data += payload
                ended = kind in (_DATA, _HEADERS) and flags & _END_STREAM
                if stream == 1 and (ended or kind == _RST_STREAM) or kind == _GOAWAY:
                    return data
            chunk = sock.recv(65536)
            if not chunk:
                return data
            pending += chunk
    raise TimeoutError(f"no end of stream from {path} within {timeout_s} s")


# --- the server -------------------------------------------------------------------------------


def _started(**env: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(ML_SERVING_LOG_JSON="true", **env)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _log_lines(proc: ServerProcess) -> list[str]:
    proc.stop()  # flushes the batched lines; the whole log is kept
    return proc.log(tail=100_000).splitlines()


@pytest.fixture
def guarded() -> Iterator[ServerProcess]:
    """A server at DEBUG that requires TOKEN, with ENV_SECRET in its environment, logging every
    call (the OK calls that carry the token as their request id must write their lines)."""
    yield from _started(
        ML_SERVING_AUTH_TOKEN=TOKEN,
        ML_SERVING_LOG_LEVEL="DEBUG",
        ML_SERVING_ACCESS_LOG_SAMPLE="1",
        PAYMENTS_SECRET=ENV_SECRET,
    )


@pytest.fixture
def plain() -> Iterator[ServerProcess]:
    yield from _started(ML_SERVING_LOG_LEVEL="INFO")


def test_the_token_never_reaches_the_log_whichever_path_writes_it(
    guarded: ServerProcess,
) -> None:
    token = TOKEN.encode()
    score = score_request().SerializeToString()
    hostile = [
        [(b"authorization", b"Bearer " + token + b"\xe9")],  # grpc logs the undecodable value
        [(b"authorization", token[:12] + b"\xe9" + token[12:])],  # ... no Bearer, split token
        [(b"x-api-key", ENV_SECRET.encode() + b"\xff")],
        [(b"authorization", b"Bearer " + token + b"0")],  # a failed auth
        [(b"authorization", b"Bearer " + token), (b"x-request-id", token)],  # logged as the id
        [(b"authorization", b"Bearer " + token), (b"x-request-id", ENV_SECRET.encode())],
    ]
    for headers in hostile:
        raw_call(guarded.port, SCORE, headers, score)
    with grpc.insecure_channel(guarded.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        auth = (("authorization", f"Bearer {TOKEN}"),)
        assert stub.Score(score_request(), metadata=auth, timeout=10).scores
        # At DEBUG the rendered prompt is logged: a client can put anything in it.
        request = generate_request(goal=f"note {TOKEN} and Bearer abc{ENV_SECRET}")
        assert stub.Generate(request, metadata=auth, timeout=10).text
    lines = _log_lines(guarded)
    text = "\n".join(lines)
    for secret in (TOKEN, ENV_SECRET):
        # Any 8 characters of it in a row would be a leak (the split token above included).
        pieces = {secret[i : i + 8] for i in range(len(secret) - 7)}
        leaked = [piece for piece in pieces if piece in text]
        assert not leaked, f"{secret[:6]}... leaked: {leaked[:3]}"
    records = [json.loads(line) for line in lines if line.startswith("{")]
    grpc_errors = [r for r in records if r["logger"].startswith("grpc") and r["level"] == "ERROR"]
    assert grpc_errors, "the undecodable headers were not logged at all: the test lost its path"
    # The prompt (and the offline route's echo of it) logged at DEBUG, with the token redacted.
    debug = [json.dumps(r) for r in records if r["level"] == "DEBUG"]
    assert any(f"note {REDACTED}" in line for line in debug), "the DEBUG path was not taken"
    assert any(r.get("request_id") == "<redacted>" for r in records)


def test_undecodable_header_bytes_cannot_flood_the_log(plain: ServerProcess) -> None:
    calls = 200
    started = time.monotonic()
    for _ in range(calls):
        # Health too: probes are open to anyone, no token needed to reach grpc's decoder.
        reply = raw_call(plain.port, HEALTH_CHECK, [(b"x-client", b"caf\xe9")], b"")
        assert reply == HEALTH_SERVING  # the call itself is fine
    elapsed = time.monotonic() - started
    lines = _log_lines(plain)
    noisy = [line for line in lines if '"level": "ERROR"' in line or "Traceback" in line]
    assert 1 <= len(noisy) <= 3, f"{len(noisy)} ERROR lines for {calls} calls in {elapsed:.1f} s"
    assert sum(map(len, noisy)) < 2_000, noisy[:2]
