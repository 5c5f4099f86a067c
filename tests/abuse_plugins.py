#!/usr/bin/env python3
"""Verifiers for the abuse tests (tests/integration/test_abuse_sandbox.py): named by
import path, or run as an external verifier program (msgpack over stdio)."""
import os
import struct
import sys


def environ_probe(completion: str, fields: dict) -> tuple:
    """1 when the secret of the row is nowhere in this process's environment; reports
    which variables it has and the one the config passes."""
    leaked = any(fields["secret"] in value for value in os.environ.values())
    return float(not leaked), {"names": sorted(os.environ), "passed": os.environ.get("GRPO_TEST_PASSED"),
                               "home": os.environ.get("HOME")}


def bytes_info(completion: str, fields: dict) -> tuple:
    """Reports what neither JSON nor msgpack carries as it is."""
    return 1.0, {"raw": b"\xff\x00ok", "keys": {1: b"one", (2, 3): "pair"}, "tags": {"a"},
                 "huge": 2**80, "obj": object()}


def own_error(completion: str, fields: dict) -> tuple:
    """Answers every sample, with an `error` key of its own in the info."""
    return 0.0, {"error": "no answer in the completion"}


def main() -> None:
    """As an external program: environ_probe over the protocol, with bytes in its info."""
    import msgpack

    read, out = sys.stdin.buffer.read, sys.stdout.buffer
    while True:
        header = read(4)
        if len(header) < 4:
            return
        request = msgpack.unpackb(read(struct.unpack(">I", header)[0]), raw=False)
        fields = request.get("fields") or {}
        leaked = "secret" in fields and any(fields["secret"] in v for v in os.environ.values())
        info = {"passed": os.environ.get("GRPO_TEST_PASSED"), "raw": b"\xfe\xff"}
        body = msgpack.packb({"id": request["id"], "score": float(not leaked), "info": info, "error": None},
                             use_bin_type=True)
        out.write(struct.pack(">I", len(body)) + body)
        out.flush()


if __name__ == "__main__":
    main()
