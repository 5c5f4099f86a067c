#!/usr/bin/env python3
"""A complete external environment: answer, and on a wrong answer, feedback and another try.

Run by a reward worker as a child (stdin/stdout; env.external.command), one process
serving many episodes. Needs only `msgpack`; the same frames can be spoken from any
language (README, "Environments and tools"):

  frame    = 4-byte big-endian length + msgpack map (at most MAX_FRAME bytes)
  request  = {"id": int, "verifier": str, "kind": "reset" | "step" | "close",
              "episode": int, "row": map (reset), "turn": str (step), "timeout_s": float}
  response = {"id": int, "score": float, "info": map, "error": str or nil}
  a step's info = {"observation": str or nil, "done": bool, "info": map}

reset starts an episode on its dataset row; step gets the text of the model's latest
turn; close ends it (an unknown episode is fine: it is over either way). A step for an
episode this process does not hold (it restarted) answers an error with info
{"lost": true}: the episode is re-run from its first turn.

    python examples/retry_env.py [TRIES]    # TRIES answers per episode (default 2)
"""
import re
import struct
import sys

import msgpack

MAX_FRAME = 16 * 2**20  # as rewards/protocol.py's MAX_FRAME_BYTES
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


class Retry:
    def __init__(self, row, tries):
        self.answer, self.left = str(row.get("answer", "")).strip(), tries

    def step(self, turn):
        """-> (observation or None, done, reward of this turn, info)."""
        got = ANSWER.findall(turn)
        self.left -= 1
        if got and got[-1].strip() == self.answer:
            return None, True, 0.0, {"solved": 1}
        if self.left <= 0:
            return None, True, 0.0, {"solved": 0}
        # the feedback, appended to the conversation; the model's next turn follows it
        return " wrong, try again: ", False, 0.0, {"retry": 1}


def answer(episodes, request, tries):
    kind, episode = request.get("kind"), request.get("episode")
    out = {"id": request.get("id"), "score": 0.0, "info": {}, "error": None}
    if kind == "reset":
        episodes[episode] = Retry(request.get("row") or {}, tries)
    elif kind == "close":
        episodes.pop(episode, None)
    elif kind == "step":
        if episode not in episodes:
            return {**out, "error": f"unknown episode {episode}", "info": {"lost": True}}
        observation, done, reward, info = episodes[episode].step(request.get("turn", ""))
        out.update(score=reward, info={"observation": observation, "done": done, "info": info})
    else:
        out["error"] = f"this environment serves no {kind!r} requests"
    return out


def main():
    tries = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    read, out, episodes = sys.stdin.buffer.read, sys.stdout.buffer, {}
    while True:
        header = read(4)
        if len(header) < 4:
            return
        (length,) = struct.unpack(">I", header)
        if length > MAX_FRAME:
            print(f"retry_env: a frame of {length} bytes (max {MAX_FRAME}): closing", file=sys.stderr)
            return
        body = msgpack.packb(answer(episodes, msgpack.unpackb(read(length), raw=False), tries), use_bin_type=True)
        out.write(struct.pack(">I", len(body)) + body)
        out.flush()


if __name__ == "__main__":
    main()
