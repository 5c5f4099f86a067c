"""The reward worker's side of a verifier process or server: one request at a time,
each with a wall-clock deadline on both the write and the read.

A peer is started (and, when it announces itself, handshaken) *before* a call's
deadline begins, so a slow start never eats the budget of the call that triggered
it. A peer that hangs is killed (its whole process group) and one that dies or
garbles a frame is restarted on the next call; either way the request in flight is
answered with an error, never an exception. A score that is not a finite number is
an error too: it must never reach the learner.

A program we start gets a minimal environment (rewards/spawn.py) with a throwaway HOME,
and dies with the worker thread that started it (a parent-death signal): a worker
killed while its verifier process hangs in an import leaves nothing running."""
from __future__ import annotations

import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from rewards.api import VerifierError
from rewards.config import ExternalVerifier, RewardConfig, split_address
from rewards.protocol import HEADER, MAX_FRAME_BYTES, ProtocolError, check_response, decode_body, encode, plain
from rewards.spawn import die_with_parent, minimal_env, throwaway_home

START_TIMEOUT_S = 120.0
"""How long a verifier process may take to start and announce itself."""
REAP_TIMEOUT_S = 5.0
"""How long to wait for a killed process to be gone (one stuck in the kernel may never go)."""


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


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    """Write to a non-blocking fd before the deadline (a peer that stops reading
    fills the pipe; without a deadline the write would block forever)."""
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeout()
        _, ready, _ = select.select([], [fd], [], left)
        if not ready:
            raise PeerTimeout()
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            continue
        except BrokenPipeError:
            raise ProtocolError("peer closed its input") from None


def read_frame_by(fd: int, deadline: float, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    (length,) = HEADER.unpack(_read_exact(fd, HEADER.size, deadline))
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    return decode_body(_read_exact(fd, length, deadline))


def _result(score: float, error: str | None, kind: str, info: dict | None = None) -> dict[str, Any]:
    return {"score": score, "info": info or {}, "error": error, "kind": kind}


class Peer:
    """Shared request/response logic; subclasses open, write to and close the channel."""

    name = "peer"

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.max_frame = max_frame
        self.next_id = 0
        self.restarts = 0

    def call(self, verifier: str, completion: str, fields: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One score -> {"score", "info", "error", "kind"}; kind is "ok", "error" or "timeout"."""
        return self.send({"verifier": verifier, "completion": completion, "fields": fields}, timeout_s)

    def send(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One request of any kind of rewards/protocol.py (its id and timeout_s added)
        -> {"score", "info", "error", "kind"}, as `call`."""
        self.next_id += 1
        verifier = request.get("verifier")
        request = {"id": self.next_id, **request, "timeout_s": timeout_s}
        try:
            frame = encode(request, self.max_frame)
        except (ProtocolError, TypeError, ValueError) as e:
            return _result(0.0, f"request rejected: {e}", "error")
        try:
            fd = self._ensure_open()  # start-up and handshake: outside the call's deadline
        except VerifierError as e:  # names the peer already
            self._reset()
            return _result(0.0, str(e), "error")
        except (ProtocolError, OSError, ValueError, PeerTimeout) as e:
            self._reset()
            return _result(0.0, f"{self.name}: could not start: {str(e) or 'timed out'}", "error")
        deadline = time.monotonic() + timeout_s
        try:
            self._write(frame, deadline)
            response = read_frame_by(fd, deadline, self.max_frame)
            check_response(response, self.next_id)
        except PeerTimeout:
            self._reset()
            return _result(0.0, f"{self.name}: timed out after {timeout_s:g} s", "timeout")
        except (ProtocolError, OSError, ValueError) as e:
            self._reset()
            return _result(0.0, f"{self.name}: {e}", "error")
        info = plain(response.get("info") or {})  # bytes from a program: never a crash further on
        if response.get("error") is not None:
            return _result(0.0, str(response["error"]), "error", info)
        score = float(response["score"])
        if not math.isfinite(score):
            return _result(0.0, f"{self.name}: verifier {verifier!r} returned a non-finite score {score}", "error", info)
        return _result(score, None, "ok", info)

    def _reset(self) -> None:
        self.close()
        self.restarts += 1

    def _ensure_open(self) -> int: ...

    def _write(self, frame: bytes, deadline: float) -> None: ...

    def close(self) -> None: ...


class ProcessPeer(Peer):
    """A verifier program on our stdin/stdout pipes, in its own process group.
    `handshake`: the program writes one {"ready": true} frame once it can serve
    (our own verifier process does; external programs may opt in). `env`: its
    environment, HOME excepted (default: rewards/spawn.py's minimal one)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, name: str = "verifier process",
                 handshake: bool = False, start_timeout_s: float = START_TIMEOUT_S, **kw) -> None:
        super().__init__(**kw)
        self.argv, self.name = argv, name
        self.env = minimal_env() if env is None else {k: v for k, v in env.items() if k != "HOME"}
        self.handshake, self.start_timeout_s = handshake, start_timeout_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the program (and wait for its ready frame); a no-op when it runs. A
        program that cannot start or announce itself -> VerifierError naming it (OSError
        when it cannot be executed)."""
        if self.proc is not None:
            return
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**self.env, "HOME": throwaway_home()}, start_new_session=True,
                                     preexec_fn=die_with_parent())
        os.set_blocking(self.proc.stdin.fileno(), False)
        if self.handshake:
            try:
                hello = read_frame_by(self.proc.stdout.fileno(), time.monotonic() + self.start_timeout_s, self.max_frame)
            except (ProtocolError, PeerTimeout) as e:
                self.close()
                why = str(e) or f"no ready frame within {self.start_timeout_s:g} s"
                raise VerifierError(f"{self.name} did not start: {why}") from None
            if hello.get("ready") is not True:
                self.close()
                raise VerifierError(f"{self.name}: {hello.get('error') or f'expected a ready frame, got {hello!r}'}")

    def _ensure_open(self) -> int:
        self.start()
        if self.proc.poll() is not None:
            raise ProtocolError(f"exited with code {self.proc.returncode}")
        return self.proc.stdout.fileno()

    def _write(self, frame: bytes, deadline: float) -> None:
        _write_all(self.proc.stdin.fileno(), frame, deadline)

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # it and anything it started
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # stuck in the kernel: give up on it, never hang the worker
            print(f"{self.name}: pid {self.proc.pid} still there {REAP_TIMEOUT_S:g} s after SIGKILL", file=sys.stderr)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.proc = None


class SocketPeer(Peer):
    """A verifier server at host:port speaking the same frames over TCP."""

    def __init__(self, address: str, name: str | None = None, connect_timeout_s: float = 5.0, **kw) -> None:
        super().__init__(**kw)
        self.address, self.port = split_address(address)
        self.name = name or f"verifier server {address}"
        self.connect_timeout_s = connect_timeout_s
        self.sock: socket.socket | None = None

    def _ensure_open(self) -> int:
        if self.sock is None:
            self.sock = socket.create_connection((self.address, self.port), timeout=self.connect_timeout_s)
            self.sock.settimeout(None)
        return self.sock.fileno()

    def _write(self, frame: bytes, deadline: float) -> None:
        self.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        try:
            self.sock.sendall(frame)
        except socket.timeout:
            raise PeerTimeout() from None
        finally:
            if self.sock is not None:
                self.sock.settimeout(None)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def child_env(cfg: RewardConfig) -> dict[str, str]:
    """The environment of our own verifier processes: the minimal one that imports the
    project and plug-ins (never a user site of the shared throwaway HOME), the variables
    the Python verifiers' `env` name, and the limits the child applies."""
    names = [n for name in cfg.verifiers if name not in cfg.external for n in cfg.spec(name).env]
    return {**minimal_env(names, python=True), "PYTHONNOUSERSITE": "1", "GRPO_VERIFIER_MEMORY_MB": str(cfg.memory_mb),
            "GRPO_ALLOW_UNSANDBOXED_CODE": "1" if cfg.allow_unsandboxed_code else "0"}


def external_peer(name: str, ext: ExternalVerifier) -> Peer:
    if ext.command is not None:
        return ProcessPeer(ext.command, env=minimal_env(ext.env), handshake=ext.ready,
                           name=f"external verifier {name!r}")
    return SocketPeer(ext.address, name=f"external verifier {name!r} at {ext.address}")
