"""Where environment steps run: in killable processes of the reward workers.

`python -m rewards.env_host SPEC_JSON` ({"name", "args"}) serves one Python environment
class (rewards/envs.py) over stdin/stdout with the frames of rewards/protocol.py (reset,
step, close), one instance per episode. External environments, in any language, speak
the same frames as programs or servers (env.external). A reward worker keeps
`rewards.concurrency` such processes (`EnvHost`) and pins each episode to one of them.

What can go wrong costs one turn or one episode, never the run:
- the environment raises in `step`: the turn gets an error observation
  (`<error>...</error>`, counted in env/tool_errors) and the episode goes on;
- a call past env.timeout_s: the process is killed (and restarted on the next call), the
  episode ends where it is (env/timeouts);
- the process is lost (it crashed, or was killed for another episode's timeout): every
  episode it held answers "lost" at its next call and is re-run from its first turn.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rewards.protocol import CLOSE, RESET, STEP, ProtocolError, check_request, plain, serve_requests, write_frame
from rewards.spawn import child_stdout

ERROR_CHARS = 500
"""An environment's error, as the observation of the turn that raised it, is cut to this."""


# ------------------------------------------------------------ the environment process
def _response(request: dict, error: str | None = None, reward: float = 0.0, info: dict | None = None) -> dict:
    return {"id": request.get("id"), "score": reward, "info": info or {}, "error": error}


def answer(cls: type, args: dict, episodes: dict[int, Any], request: dict) -> dict:
    try:
        check_request(request)
    except ProtocolError as e:
        return _response(request, f"protocol: {e}")
    kind, episode = request.get("kind"), request["episode"]
    if kind == RESET:
        try:
            env = cls(**args)
            env.reset(request["row"])
        except Exception as e:
            return _response(request, f"reset raised {traceback.format_exception_only(type(e), e)[-1].strip()}")
        episodes[episode] = env
        return _response(request)
    if kind not in (STEP, CLOSE):
        return _response(request, f"an environment process serves no {kind!r} requests")
    env = episodes.pop(episode, None) if kind == CLOSE else episodes.get(episode)
    if env is None:
        return _response(request, None if kind == CLOSE else f"unknown episode {episode}", info={"lost": kind == STEP})
    if kind == CLOSE:
        close = getattr(env, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # the episode is over either way
                pass
        return _response(request)
    try:
        step = env.step(request["turn"])
        observation, done, reward = step.observation, bool(step.done), float(step.reward)
        if observation is not None and not isinstance(observation, str):
            raise TypeError(f"Step.observation must be a str or None, not {type(observation).__name__}")
        info = plain(step.info or {})
    except Exception as e:  # the environment's failure (a malformed Step too) is this turn's observation
        why = traceback.format_exception_only(type(e), e)[-1].strip()[:ERROR_CHARS]
        return _response(request, info={"observation": f"<error>{why}</error>", "done": False,
                                        "info": {"tool_error": 1, "env_error": why}})
    return _response(request, reward=reward, info={"observation": observation, "done": done,
                                                   "info": info if isinstance(info, dict) else {}})


def serve(spec: dict, stdin, stdout) -> None:
    from rewards.envs import EnvError, resolve_env

    try:
        cls = resolve_env(spec["name"])
    except EnvError as e:
        write_frame(stdout, {"ready": False, "error": str(e), "pid": os.getpid()})
        return
    write_frame(stdout, {"ready": True, "pid": os.getpid()})
    episodes: dict[int, Any] = {}
    serve_requests(stdin, stdout, lambda request: answer(cls, spec.get("args") or {}, episodes, request))


def main() -> None:
    serve(json.loads(sys.argv[1]), sys.stdin.buffer, child_stdout())


# ------------------------------------------------------------ the reward worker's side
class EnvHost:
    """`slots` environment processes (or connections to an external one) of one reward
    worker; episode e lives in slot e % slots. `step` answers a batch of turns, the
    slots in parallel, each slot's in order."""

    def __init__(self, env: Any, rewards: Any, worker: int) -> None:
        from rewards.peer import ProcessPeer, child_env, external_peer

        self.env, self.name = env, env.name
        self.peers = []
        for k in range(rewards.concurrency):
            if env.external is not None:
                self.peers.append(external_peer(env.name, env.external))
            else:
                argv = [sys.executable, "-m", "rewards.env_host", json.dumps({"name": env.name, "args": env.args})]
                self.peers.append(ProcessPeer(argv, env=child_env(rewards), handshake=True,
                                              name=f"reward worker {worker} environment process {k}"))
        self.locks = [threading.Lock() for _ in self.peers]
        self.pool = ThreadPoolExecutor(max_workers=len(self.peers), thread_name_prefix=f"env-{worker}")

    def _call(self, slot: int, request: dict) -> dict:
        peer = self.peers[slot]
        before = peer.restarts
        result = peer.send({"verifier": self.name, **request}, self.env.timeout_s)
        if peer.restarts > before and result["kind"] != "timeout":  # the process died under this call
            result = {**result, "kind": "lost"}
        elif result["kind"] == "error" and result["info"].get("lost"):
            result = {**result, "kind": "lost"}
        return result

    def _one(self, request: dict) -> dict:
        """{"episode", "turn", "row" (first turn: reset before), "close" (close after)} ->
        {"episode", "kind": ok|timeout|lost|error, "observation", "done", "reward", "info", "error", "seconds"}."""
        episode = request["episode"]
        slot = episode % len(self.peers)
        t0 = time.perf_counter()
        out = {"episode": episode, "observation": None, "done": True, "reward": 0.0, "info": {}, "error": None}
        with self.locks[slot]:
            if request.get("turn") is None:  # close only
                self._call(slot, {"kind": CLOSE, "episode": episode})
                return {**out, "kind": "ok", "seconds": time.perf_counter() - t0}
            result = {"kind": "ok"}
            if "row" in request:
                result = self._call(slot, {"kind": RESET, "episode": episode, "row": request["row"]})
            if result["kind"] == "ok":
                result = self._call(slot, {"kind": STEP, "episode": episode, "turn": request["turn"]})
            kind = result["kind"]
            if kind == "ok":
                info = result["info"]
                obs = info.get("observation")
                out.update(observation=obs if isinstance(obs, str) else None, reward=result["score"],
                           done=info.get("done") is True or not isinstance(obs, str),
                           info=info.get("info") if isinstance(info.get("info"), dict) else {})
            else:
                out["error"] = result["error"]
            if kind in ("ok", "error") and (out["done"] or request.get("close")):
                self._call(slot, {"kind": CLOSE, "episode": episode})
        return {**out, "kind": kind, "seconds": time.perf_counter() - t0}

    def step(self, requests: list[dict]) -> list[dict]:
        return list(self.pool.map(self._one, requests))

    def close(self) -> None:
        for p in self.peers:
            p.close()


if __name__ == "__main__":
    main()
