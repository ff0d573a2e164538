"""A raw HTTP/2 gRPC client (hyper-h2 over a socket) for what grpc's own clients refuse to send:
header values with non-ASCII bytes, malformed frames. Unary calls only; bounded by a timeout."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings


@dataclass
class RawReply:
    """What came back on the stream: headers, body bytes and trailers, as bytes."""

    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: bool = False

    @property
    def status(self) -> int | None:
        """The grpc-status (trailers, or headers for a trailers-only reply), None if absent."""
        value = self.trailers.get(b"grpc-status", self.headers.get(b"grpc-status"))
        return None if value is None else int(value)

    def message(self) -> bytes:
        """The first length-prefixed gRPC message of the body (b"" when none)."""
        if len(self.body) < 5:
            return b""
        (length,) = struct.unpack(">I", self.body[1:5])
        return self.body[5 : 5 + length]


def unary_call(
    address: tuple[str, int],
    path: str,
    payload: bytes,
    extra_headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    timeout_s: float = 10.0,
) -> RawReply:
    """One unary gRPC call with headers sent exactly as given (bytes, unvalidated)."""
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    deadline = time.monotonic() + timeout_s
    reply = RawReply()
    with socket.create_connection(address, timeout=timeout_s) as sock:
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", f"{address[0]}:{address[1]}".encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *extra_headers,
        ]
        conn.send_headers(stream_id, headers)
        conn.send_data(stream_id, b"\x00" + struct.pack(">I", len(payload)) + payload)
        conn.end_stream(stream_id)
        sock.sendall(conn.data_to_send())
        done = False
        while not done and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    reply.headers = dict(event.headers)
                    if b"grpc-status" in reply.headers:
                        done = True  # trailers-only
                elif isinstance(event, h2.events.DataReceived):
                    reply.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    reply.trailers = dict(event.headers)
                    done = True
                elif isinstance(event, h2.events.StreamReset):
                    reply.reset = done = True
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
            sock.sendall(conn.data_to_send())
    return reply


class StalledStream:
    """A server-streaming call whose client never reads: its flow-control window is zero, so
    the server cannot send one byte of a message. Open until `close()` (or the with-block)."""

    def __init__(self, address: tuple[str, int], path: str, payload: bytes) -> None:
        self._conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
        )
        self._conn.initiate_connection()
        self._sock = socket.create_connection(address, timeout=10)
        stream_id = self._conn.get_next_available_stream_id()
        self._conn.send_headers(
            stream_id,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", f"{address[0]}:{address[1]}".encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ],
        )
        self._conn.send_data(
            stream_id, b"\x00" + struct.pack(">I", len(payload)) + payload, end_stream=True
        )
        self._sock.sendall(self._conn.data_to_send())

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> StalledStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
