"""Bounded logs (issue 19, item 4) and the example external verifier's frame cap (item 9):
real processes writing through the same file descriptors an actor's libraries use."""
import os
import socket
import struct
import subprocess
import sys
import time

import msgpack

from rollout.host import LOG_FILE_ENV, LOG_MAX_ENV, RotatingLog
from tests.helpers import EXAMPLES

FLOOD = """
import os, sys
from rollout.host import redirect_output_from_env
redirect_output_from_env()
for i in range(2000):
    print("python line", i, "x" * 200)          # Python's stdout
    os.write(2, b"C-level line " + b"y" * 200 + b"\\n")  # what a C library writes to fd 2
sys.stdout.flush()
import time; time.sleep(0.5)                    # let the drain thread write the tail
"""


def test_an_actor_log_rotates_at_its_bound_and_keeps_the_latest(tmp_path):
    log = tmp_path / "logs" / "generator-0.log"
    env = {**os.environ, LOG_FILE_ENV: str(log), LOG_MAX_ENV: str(100_000)}
    subprocess.run([sys.executable, "-c", FLOOD], env=env, timeout=60, check=True)
    sizes = {p.name: p.stat().st_size for p in log.parent.iterdir()}
    assert set(sizes) == {"generator-0.log", "generator-0.log.1"}  # one backup, no more
    assert all(size <= 100_000 for size in sizes.values())  # ~860 kB written in all
    text = log.read_text()
    assert "python line 1999" in text and "C-level line" in text  # the latest output, both kinds


def test_rotating_log_splits_a_write_across_files_exactly(tmp_path):
    log = RotatingLog(str(tmp_path / "a.log"), 10)
    log.write(b"0123456789abcde")
    assert (tmp_path / "a.log.1").read_bytes() == b"0123456789" and (tmp_path / "a.log").read_bytes() == b"abcde"


def test_the_example_verifier_refuses_a_frame_bigger_than_its_cap():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(EXAMPLES / "external_verifier.py"), "--port", str(port)],
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                time.sleep(0.05)
        with conn:
            conn.sendall(struct.pack(">I", 4 * 2**30 - 1))  # announces 4 GiB
            assert conn.recv(1) == b""  # closed, nothing allocated for it
        with socket.create_connection(("127.0.0.1", port), timeout=5) as ok:  # and it still serves
            body = msgpack.packb({"id": 1, "verifier": "x", "completion": "<answer>3</answer>",
                                  "fields": {"answer": "3"}})
            ok.sendall(struct.pack(">I", len(body)) + body)
            (n,) = struct.unpack(">I", ok.recv(4))
            assert msgpack.unpackb(ok.recv(n))["score"] == 1.0
    finally:
        server.kill()
        server.wait(timeout=10)
