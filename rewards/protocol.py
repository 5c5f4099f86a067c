"""The verifier wire protocol: length-prefixed msgpack frames.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of one
msgpack map. Over stdin/stdout of a child process or over a TCP connection, both
directions. Nothing is ever unpickled: msgpack carries only plain data.

A request has an integer "id", the "verifier" it is for, an optional "timeout_s" (the
call's budget) and a "kind" (absent: "score"); each kind has its own fields:

    score            {"completion": str, "fields": map}
                     -> the verifier's score of the completion (rewards/api.py)
    answer_classes   {"answers": [[str | nil]]}
                     -> info {"classes": [[int | nil]]}: the verifier's answer_classes
                        (rewards/api.py) of each list of answers; score 0

Environments (multi-turn episodes, rewards/envs.py) speak the same frames; "verifier"
names the environment, "episode" (int) the episode, one environment instance each:

    reset            {"episode": int, "row": map}
                     -> score 0: a new episode on the dataset row
    step             {"episode": int, "turn": str}
                     -> score: the environment's own reward of this turn;
                        info {"observation": str | nil, "done": bool, "info": map}
                        (observation nil or done: the episode is over)
    close            {"episode": int}
                     -> score 0: the episode is over, its state can go

    An environment that does not know the episode (it restarted) answers with an error
    and info {"lost": true}: the episode is re-run from its first turn.

Responses: {"id": int, "score": float, "info": map, "error": str | nil}. Every verifier
serves "score"; "answer_classes" is served by our own verifier process (rewards/child.py),
and a program that does not serve a kind answers it with an error.
"""
from __future__ import annotations

import numbers
import struct
from typing import Any, BinaryIO, Callable

import msgpack

MAX_FRAME_BYTES = 16 * 2**20
HEADER = struct.Struct(">I")
"""The length prefix of a frame."""
SCORE = "score"
ANSWER_CLASSES = "answer_classes"
RESET, STEP, CLOSE = "reset", "step", "close"


class ProtocolError(Exception):
    """A malformed or oversized frame: the peer can no longer be trusted to be in sync."""


def encode(obj: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_bytes:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {max_bytes}")
    return HEADER.pack(len(body)) + body


def plain(obj: Any, depth: int = 0) -> Any:
    """`obj` as plain data that msgpack, JSON and the rollout record all carry: bytes
    decoded (invalid UTF-8 as \\x escapes), tuples and sets as lists, map keys and
    integers msgpack cannot hold as text, anything else (and what is nested past 32
    levels) as its repr, cut. For what verifiers report in `info`: never a reason to
    fail a sample."""
    if obj is None or isinstance(obj, (bool, str, float)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj) if -2**63 <= obj < 2**64 else str(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "backslashreplace")
    if depth < 32 and isinstance(obj, dict):
        return {k if isinstance(k, str) else str(plain(k, depth + 1)): plain(v, depth + 1) for k, v in obj.items()}
    if depth < 32 and isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1) for v in obj]
    return repr(obj)[:200]


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
    header = read_exact(stream, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    body = read_exact(stream, length)
    if body is None:
        raise ProtocolError("stream ended after a frame header")
    return decode_body(body)


def write_frame(stream: BinaryIO, obj: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> None:
    stream.write(encode(obj, max_bytes))
    stream.flush()


def _check_score(obj: dict[str, Any]) -> None:
    if not isinstance(obj.get("completion"), str):
        raise ProtocolError("request needs a string 'completion'")
    if not isinstance(obj.get("fields", {}), dict):
        raise ProtocolError("request 'fields' must be a map")


def _check_answer_classes(obj: dict[str, Any]) -> None:
    answers = obj.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, list) for a in answers):
        raise ProtocolError("request needs 'answers', a list of lists")


def _check_episode(obj: dict[str, Any]) -> None:
    if not isinstance(obj.get("episode"), int) or isinstance(obj.get("episode"), bool):
        raise ProtocolError("request needs an integer 'episode'")
    kind = obj["kind"]
    if kind == RESET and not isinstance(obj.get("row"), dict):
        raise ProtocolError("a reset request needs the dataset 'row', a map")
    if kind == STEP and not isinstance(obj.get("turn"), str):
        raise ProtocolError("a step request needs a string 'turn'")


REQUEST_KINDS = {SCORE: _check_score, ANSWER_CLASSES: _check_answer_classes, RESET: _check_episode,
                 STEP: _check_episode, CLOSE: _check_episode}
"""Request kind -> the check of its own fields."""


def check_request(obj: dict[str, Any]) -> None:
    if not isinstance(obj.get("id"), int):
        raise ProtocolError("request needs an integer 'id'")
    if not isinstance(obj.get("verifier"), str):
        raise ProtocolError("request needs a string 'verifier'")
    kind = obj.get("kind", SCORE)
    if not isinstance(kind, str) or kind not in REQUEST_KINDS:
        raise ProtocolError(f"unknown request kind {kind!r}; known: {sorted(REQUEST_KINDS)}")
    REQUEST_KINDS[kind](obj)


def check_response(obj: dict[str, Any], expected_id: int) -> None:
    if obj.get("id") != expected_id:
        raise ProtocolError(f"response id {obj.get('id')!r} does not match request id {expected_id}")
    if obj.get("error") is None and not isinstance(obj.get("score"), (int, float)):
        raise ProtocolError("response needs a numeric 'score' or an 'error'")
    if not isinstance(obj.get("info") or {}, dict):
        raise ProtocolError("response 'info' must be a map")


def serve_requests(stdin: BinaryIO, stdout: BinaryIO, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The loop of a process of ours that serves frames (a verifier process, an
    environment process), after its ready frame: each request -> answer(request) ->
    its response, until stdin closes. A frame that does not decode ends it (one error
    frame first); a response msgpack cannot carry is answered as an error."""
    while True:
        try:
            request = read_frame(stdin)
        except ProtocolError as e:
            write_frame(stdout, {"id": -1, "score": 0.0, "info": {}, "error": f"protocol: {e}"})
            return
        if request is None:
            return
        response = answer(request)
        try:
            write_frame(stdout, response)
        except (ProtocolError, TypeError, ValueError) as e:  # info that msgpack cannot carry
            write_frame(stdout, {"id": request.get("id"), "score": 0.0, "info": {}, "error": f"bad result: {e}"})
