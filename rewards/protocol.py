"""The verifier wire protocol: length-prefixed msgpack frames.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of one
msgpack map. Requests: {"id": int, "verifier": str, "completion": str, "fields": map}.
Responses: {"id": int, "score": float, "info": map, "error": str | nil}.
Over stdin/stdout of a child process or over a TCP connection, both directions.
Nothing is ever unpickled: msgpack carries only plain data.
"""
from __future__ import annotations

import struct
from typing import Any, BinaryIO

import msgpack

MAX_FRAME_BYTES = 16 * 2**20
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A malformed or oversized frame: the peer can no longer be trusted to be in sync."""


def encode(obj: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_bytes:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {max_bytes}")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for garbage
        raise ProtocolError(f"malformed msgpack frame: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"a frame must hold a map, got {type(obj).__name__}")
    return obj


def read_exact(stream: BinaryIO, n: int) -> bytes | None:
    """n bytes, or None on a clean end of stream before the first byte."""
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            if got == 0:
                return None
            raise ProtocolError(f"stream ended inside a frame ({got} of {n} bytes)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(stream: BinaryIO, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any] | None:
    """The next frame's map, or None at end of stream."""
    header = read_exact(stream, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    body = read_exact(stream, length)
    if body is None:
        raise ProtocolError("stream ended after a frame header")
    return decode_body(body)


def write_frame(stream: BinaryIO, obj: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> None:
    stream.write(encode(obj, max_bytes))
    stream.flush()


def check_request(obj: dict[str, Any]) -> None:
    if not isinstance(obj.get("id"), int):
        raise ProtocolError("request needs an integer 'id'")
    if not isinstance(obj.get("verifier"), str):
        raise ProtocolError("request needs a string 'verifier'")
    if not isinstance(obj.get("completion"), str):
        raise ProtocolError("request needs a string 'completion'")
    if not isinstance(obj.get("fields", {}), dict):
        raise ProtocolError("request 'fields' must be a map")


def check_response(obj: dict[str, Any], expected_id: int) -> None:
    if obj.get("id") != expected_id:
        raise ProtocolError(f"response id {obj.get('id')!r} does not match request id {expected_id}")
    if obj.get("error") is None and not isinstance(obj.get("score"), (int, float)):
        raise ProtocolError("response needs a numeric 'score' or an 'error'")
    if not isinstance(obj.get("info") or {}, dict):
        raise ProtocolError("response 'info' must be a map")
