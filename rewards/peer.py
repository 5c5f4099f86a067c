"""The reward worker's side of a verifier process or server: one request at a time,
each with a wall-clock deadline. A peer that hangs is killed (its whole process
group) and one that dies or garbles a frame is restarted on the next call; either
way the request in flight is answered with an error, never an exception."""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from typing import Any

from rewards.protocol import MAX_FRAME_BYTES, ProtocolError, _HEADER, check_response, decode_body, encode


class PeerTimeout(Exception):
    pass


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeout()
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            raise PeerTimeout()
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise ProtocolError("peer closed the stream")
        buf += chunk
    return bytes(buf)


def read_frame_by(fd: int, deadline: float, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    (length,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    return decode_body(_read_exact(fd, length, deadline))


class _Peer:
    """Shared request/response logic; subclasses open, write to and close the channel."""

    name = "peer"

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.max_frame = max_frame
        self.next_id = 0
        self.restarts = 0

    def call(self, verifier: str, completion: str, fields: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """-> {"score", "info", "error", "kind"}; kind is "ok", "error" or "timeout"."""
        self.next_id += 1
        request = {"id": self.next_id, "verifier": verifier, "completion": completion, "fields": fields}
        try:
            frame = encode(request, self.max_frame)
        except (ProtocolError, TypeError, ValueError) as e:
            return {"score": 0.0, "info": {}, "error": f"request rejected: {e}", "kind": "error"}
        deadline = time.monotonic() + timeout_s
        try:
            fd = self._ensure_open()
            self._write(frame)
            response = read_frame_by(fd, deadline, self.max_frame)
            check_response(response, self.next_id)
        except PeerTimeout:
            self._reset()
            return {"score": 0.0, "info": {}, "error": f"{self.name}: timed out after {timeout_s:g} s", "kind": "timeout"}
        except (ProtocolError, OSError, ValueError) as e:
            self._reset()
            return {"score": 0.0, "info": {}, "error": f"{self.name}: {e}", "kind": "error"}
        if response.get("error") is not None:
            return {"score": 0.0, "info": response.get("info") or {}, "error": str(response["error"]), "kind": "error"}
        return {"score": float(response["score"]), "info": response.get("info") or {}, "error": None, "kind": "ok"}

    def _reset(self) -> None:
        self.close()
        self.restarts += 1

    def _ensure_open(self) -> int: ...

    def _write(self, frame: bytes) -> None: ...

    def close(self) -> None: ...


class ProcessPeer(_Peer):
    """A verifier program on our stdin/stdout pipes, in its own process group."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, name: str = "verifier process", **kw) -> None:
        super().__init__(**kw)
        self.argv, self.env, self.name = argv, env, name
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is None:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, start_new_session=True,
            )

    def _ensure_open(self) -> int:
        self.start()
        if self.proc.poll() is not None:
            raise ProtocolError(f"exited with code {self.proc.returncode}")
        return self.proc.stdout.fileno()

    def _write(self, frame: bytes) -> None:
        self.proc.stdin.write(frame)
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # it and anything it started
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.proc = None


class SocketPeer(_Peer):
    """A verifier server at host:port speaking the same frames over TCP."""

    def __init__(self, address: str, name: str | None = None, connect_timeout_s: float = 5.0, **kw) -> None:
        super().__init__(**kw)
        host, _, port = address.rpartition(":")
        self.address, self.port = host, int(port)
        self.name = name or f"verifier server {address}"
        self.connect_timeout_s = connect_timeout_s
        self.sock: socket.socket | None = None

    def _ensure_open(self) -> int:
        if self.sock is None:
            self.sock = socket.create_connection((self.address, self.port), timeout=self.connect_timeout_s)
            self.sock.settimeout(None)
        return self.sock.fileno()

    def _write(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
