"""Asking the node's containerd what it runs with: two CRI calls over its unix socket, with no node binary.

kubelet's own API (CRI ``runtime.v1.RuntimeService``) answers ``Status`` with ``verbose: true`` with a map whose
``config`` entry is the CRI plugin's configuration *as the running process holds it* (what ``crictl info``
prints), and ``Version`` with the running containerd's version. That is the runtime's effective view: not the
files on disk, which may have changed since it started.

gRPC is HTTP/2 with a 5-byte frame prefix on each message; the two calls need only a few protobuf fields, so
this module carries its own tiny protobuf reader and writer and uses the pure-Python ``h2`` for HTTP/2 (the one
module that imports it). From a pod with ``hostPID``, the node's socket is ``/proc/1/root<address>`` (see
``restarting.server_pid``). containerd before 1.6 spoke only ``runtime.v1alpha2``: that is asked when v1 is
unimplemented.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

SERVICES = ("runtime.v1.RuntimeService", "runtime.v1alpha2.RuntimeService")
STATUS_VERBOSE = b"\x08\x01"  # StatusRequest{verbose: true}: field 1, varint, 1
GRPC_UNIMPLEMENTED = 12
MAX_RESPONSE = 16 << 20  # the Status map of a busy node is a few hundred KB at most


class CriError(Exception):
    """The CRI call failed; the message says where and why (the socket, the gRPC status and message)."""


@dataclasses.dataclass(frozen=True)
class CriAnswer:
    """What the running containerd said about itself."""

    info: dict[str, str]
    """``StatusResponse.info`` (verbose): ``config`` is the CRI configuration as JSON."""
    conditions: tuple[Condition, ...] = ()
    version: str = ""
    """``VersionResponse.runtime_version``, e.g. ``1.6.20~ds1`` or ``v2.3.7``."""
    runtime_name: str = ""
    api: str = ""
    """The CRI service that answered (``runtime.v1.RuntimeService``)."""
    seconds: float = 0.0


def socket_path(address: str, *, in_pod: bool) -> str:
    """The node's unix socket as this process reaches it: through PID 1's root from a pod."""
    address = address.removeprefix("unix://")
    return f"/proc/1/root{address}" if in_pod else address


# --- protobuf, the few fields we need --------------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CriError("a truncated protobuf varint in containerd's answer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def parse_fields(data: bytes) -> list[tuple[int, bytes | int]]:
    """``[(field number, bytes or int)]`` of one protobuf message, in order (nested messages left as bytes)."""
    fields: list[tuple[int, bytes | int]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            fields.append((number, value))
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise CriError("a truncated protobuf field in containerd's answer")
            fields.append((number, data[pos:pos + length]))
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise CriError(f"protobuf wire type {wire} in containerd's answer: not a CRI message")
    return fields


def _text(value: bytes | int) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class Condition:
    """One ``RuntimeCondition`` of ``StatusResponse.status``."""

    type: str
    status: bool
    reason: str = ""
    message: str = ""


def parse_status_response(data: bytes) -> tuple[dict[str, str], tuple[Condition, ...]]:
    """``StatusResponse``: its ``info`` (field 2, ``map<string, string>``: entries of key 1, value 2) and the
    conditions of its ``status`` (field 1; ``RuntimeStatus.conditions`` is field 1: type, status, reason,
    message)."""
    info: dict[str, str] = {}
    conditions: list[Condition] = []
    for number, value in parse_fields(data):
        if number == 2 and isinstance(value, bytes):
            entry = dict(parse_fields(value))
            info[_text(entry.get(1, b""))] = _text(entry.get(2, b""))
        elif number == 1 and isinstance(value, bytes):
            for inner, condition in parse_fields(value):
                if inner == 1 and isinstance(condition, bytes):
                    f = dict(parse_fields(condition))
                    conditions.append(Condition(_text(f.get(1, b"")), f.get(2, 0) == 1, _text(f.get(3, b"")),
                                                _text(f.get(4, b""))))
    return info, tuple(conditions)


def parse_version_response(data: bytes) -> dict[int, str]:
    """``VersionResponse``: 1 version, 2 runtime_name, 3 runtime_version, 4 runtime_api_version."""
    return {number: _text(value) for number, value in parse_fields(data)}


# --- gRPC over HTTP/2 ----------------------------------------------------------------------------------


def _call(sock: socket.socket, conn: h2.connection.H2Connection, method: str, request: bytes,
          deadline: float) -> tuple[int, str, bytes]:
    """One unary call on an open connection: ``(grpc-status, grpc-message, response message)``."""
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":path", method),
                               (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
                               ("user-agent", "regmirror-agent")])
    conn.send_data(stream, b"\x00" + struct.pack(">I", len(request)) + request, end_stream=True)
    sock.sendall(conn.data_to_send())
    body = bytearray()
    headers: dict[str, str] = {}
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        if not chunk:
            raise CriError("containerd closed the connection before answering")
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived) \
                    and event.stream_id == stream:
                headers.update({_str(k): _str(v) for k, v in event.headers or []})
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                body += event.data or b""
                if len(body) > MAX_RESPONSE:
                    raise CriError(f"containerd's answer to {method} is larger than {MAX_RESPONSE} bytes")
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                raise CriError(f"containerd reset the {method} call (HTTP/2 error {event.error_code})")
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise CriError(f"containerd ended the connection (HTTP/2 error {event.error_code})")
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                sock.sendall(conn.data_to_send())
                return _finish(method, headers, bytes(body))
        sock.sendall(conn.data_to_send())


def _str(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _finish(method: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
    if headers.get(":status", "200") != "200":
        raise CriError(f"{method}: HTTP {headers.get(':status')} (is this socket containerd's gRPC address?)")
    try:
        status = int(headers.get("grpc-status", "0"))
    except ValueError:
        status = 2
    message = headers.get("grpc-message", "")
    if status:
        return status, message, b""
    if len(body) < 5:
        raise CriError(f"{method}: an empty answer")
    if body[0] != 0:
        raise CriError(f"{method}: a compressed answer, which was not asked for")
    (length,) = struct.unpack(">I", body[1:5])
    return 0, "", body[5:5 + length]


def ask(address: str, *, in_pod: bool = False, timeout: float = 3.0) -> CriAnswer:
    """``Status(verbose)`` and ``Version`` from the containerd serving ``address``; raises CriError."""
    path = socket_path(address, in_pod=in_pod)
    start = time.monotonic()
    deadline = start + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            problems = []
            for service in SERVICES:
                status, message, data = _call(sock, conn, f"/{service}/Status", STATUS_VERBOSE, deadline)
                if status == GRPC_UNIMPLEMENTED:
                    problems.append(f"{service}: {message or 'unimplemented'}")
                    continue
                if status:
                    raise CriError(f"{service}/Status on {address}: gRPC status {status}: {message}")
                info, conditions = parse_status_response(data)
                status, message, data = _call(sock, conn, f"/{service}/Version", b"", deadline)
                version = parse_version_response(data) if not status else {}
                return CriAnswer(info=info, conditions=conditions, version=version.get(3, ""),
                                 runtime_name=version.get(2, ""), api=service, seconds=time.monotonic() - start)
            raise CriError(f"{address} serves no CRI runtime service ({'; '.join(problems)}): containerd's CRI "
                           f"plugin is not loaded, so kubelet cannot use it either")
    except TimeoutError as exc:
        raise CriError(f"containerd did not answer on {address} within {timeout:g}s") from exc
    except OSError as exc:
        raise CriError(f"cannot reach containerd on {address} ({path}): {exc.strerror or exc}") from exc
    except h2.exceptions.ProtocolError as exc:
        raise CriError(f"{address} does not speak gRPC as containerd does: {exc}") from exc
