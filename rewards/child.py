"""A verifier process: `python -m rewards.child SPECS_JSON` serves the verifiers named
in SPECS_JSON ({name: {"target": registered name or module:attr, "args": {...}}})
over stdin/stdout with the frame protocol of rewards/protocol.py.

The reward worker runs every verifier call in such a child so that a hang (killed
on a wall-clock timeout), a crash or a memory blow-up costs one sample, not the run.
It announces itself with one {"ready": true} frame once its verifiers are imported,
so that start-up never counts against a call's deadline. External verifiers in any
language speak the same protocol (the ready frame is optional for them).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import traceback

from rewards import budget
from rewards.api import resolve, run_one
from rewards.protocol import ProtocolError, check_request, read_frame, write_frame

CLASSES = "grpo:answer_classes"
"""A request for answer equivalence classes (fields: verifier, answers), not a verifier."""


def answer(verifiers: dict, request: dict) -> dict:
    try:
        check_request(request)
    except ProtocolError as e:
        return {"id": request.get("id"), "score": 0.0, "info": {}, "error": f"protocol: {e}"}
    name = request["verifier"]
    if name == CLASSES:
        from rewards.verifiers import answer_classes

        fields = request.get("fields") or {}
        budget.start(request.get("timeout_s"))
        try:
            classes = [answer_classes(fields["verifier"], answers) for answers in fields["answers"]]
        except Exception as e:
            return {"id": request["id"], "score": 0.0, "info": {}, "error": f"answer classes: {e!r}"[:2000]}
        return {"id": request["id"], "score": 0.0, "info": {"classes": classes}, "error": None}
    if name not in verifiers:
        return {"id": request["id"], "score": 0.0, "info": {}, "error": f"unknown verifier {name!r}"}
    fn, args = verifiers[name]
    budget.start(request.get("timeout_s"))
    try:
        score = run_one(fn, request["completion"], request.get("fields") or {}, args)
    except Exception as e:  # the verifier's own failure (a KeyError included): reported, never fatal
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"id": request["id"], "score": 0.0, "info": {}, "error": f"verifier {name!r} raised {tb[:2000]}"}
    finally:
        budget.start(None)
    return {"id": request["id"], "score": score.value, "info": score.info, "error": None}


def serve(specs: dict[str, dict], stdin, stdout) -> None:
    verifiers = {name: (resolve(spec["target"]), spec.get("args") or {}) for name, spec in specs.items()}
    write_frame(stdout, {"ready": True, "pid": os.getpid()})
    while True:
        try:
            request = read_frame(stdin)
        except ProtocolError as e:
            write_frame(stdout, {"id": -1, "score": 0.0, "info": {}, "error": f"protocol: {e}"})
            return
        if request is None:
            return
        response = answer(verifiers, request)
        try:
            write_frame(stdout, response)
        except (ProtocolError, TypeError, ValueError) as e:  # info that msgpack cannot carry
            write_frame(stdout, {"id": request.get("id"), "score": 0.0, "info": {}, "error": f"bad result: {e}"})


def main() -> None:
    specs = json.loads(sys.argv[1])
    memory_mb = int(os.environ.get("GRPO_VERIFIER_MEMORY_MB", "0"))
    if memory_mb:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The protocol owns the real stdout; anything a verifier prints goes to stderr.
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(specs, sys.stdin.buffer, protocol_out)


if __name__ == "__main__":
    main()
