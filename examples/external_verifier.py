#!/usr/bin/env python3
"""A complete external verifier: exact-match scoring over length-prefixed msgpack.

Run by a reward worker as a child (stdin/stdout), or as a server with --port N
(a thread per connection: reward workers keep `rewards.concurrency` connections open;
loopback only). Needs only the `msgpack` package; the
same protocol can be spoken from any language:

  frame    = 4-byte big-endian length + msgpack map (at most MAX_FRAME bytes)
  request  = {"id": int, "verifier": str, "completion": str, "fields": map}
  response = {"id": int, "score": float, "info": map, "error": str or nil}

A frame announced longer than MAX_FRAME ends the connection: a peer never makes this
process allocate what it says.

Before a run starts, each external verifier answers one probe: a request with an empty
completion and no fields (any answer passes, an error included). As a child it starts
with a minimal environment (PATH, locale, a throwaway HOME): a key it needs is named in
the config, e.g. rewards.external.exact: {command: [...], env: [MY_API_KEY]}.
"""
import socket
import struct
import sys
import threading

import msgpack

MAX_FRAME = 16 * 2**20  # as rewards/protocol.py's MAX_FRAME_BYTES


def score(request):
    answer = str(request["fields"].get("answer", "")).strip()
    text = request["completion"]
    start, end = text.rfind("<answer>"), text.rfind("</answer>")
    got = text[start + len("<answer>"):end].strip() if 0 <= start < end else ""
    return {"id": request["id"], "score": float(got == answer), "info": {"extracted": got}, "error": None}


def serve(read, write):
    while True:
        header = read(4)
        if len(header) < 4:
            return
        (length,) = struct.unpack(">I", header)
        if length > MAX_FRAME:
            print(f"external_verifier: a frame of {length} bytes (max {MAX_FRAME}): closing", file=sys.stderr)
            return
        request = msgpack.unpackb(read(length), raw=False)
        try:
            response = score(request)
        except Exception as e:
            response = {"id": request.get("id"), "score": 0.0, "info": {}, "error": repr(e)}
        body = msgpack.packb(response, use_bin_type=True)
        write(struct.pack(">I", len(body)) + body)


def read_exactly(recv):
    def read(n):
        buf = b""
        while len(buf) < n:
            chunk = recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf
    return read


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--port":
        server = socket.create_server(("127.0.0.1", int(sys.argv[2])))
        def handle(conn):
            with conn:
                serve(read_exactly(conn.recv), conn.sendall)

        while True:
            conn, _ = server.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    else:
        out = sys.stdout.buffer

        def write(data):
            out.write(data)
            out.flush()

        serve(read_exactly(sys.stdin.buffer.read), write)
