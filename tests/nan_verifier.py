#!/usr/bin/env python3
"""An external verifier (msgpack over stdio) that answers the completion's own text as
its score: "nan", "inf", "-inf" or a number. For the non-finite boundary tests."""
import struct
import sys

import msgpack


def main():
    read, out = sys.stdin.buffer.read, sys.stdout.buffer
    while True:
        header = read(4)
        if len(header) < 4:
            return
        request = msgpack.unpackb(read(struct.unpack(">I", header)[0]), raw=False)
        body = msgpack.packb({"id": request["id"], "score": float(request["completion"]), "info": {}, "error": None})
        out.write(struct.pack(">I", len(body)) + body)
        out.flush()


if __name__ == "__main__":
    main()
