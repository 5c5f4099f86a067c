"""A verifier process: `python -m rewards.child SPECS_JSON` serves the verifiers named
in SPECS_JSON ({name: {"target": registered name or module:attr, "args": {...}}})
over stdin/stdout with the frame protocol of rewards/protocol.py.

The reward worker runs every verifier call in such a child so that a hang (killed
on a wall-clock timeout), a crash or a memory blow-up costs one sample, not the run.
It announces itself with one {"ready": true} frame once its verifiers are imported,
so that start-up never counts against a call's deadline; a verifier that cannot be
imported is one {"ready": false, "error": "<one line>"} frame instead, and the process
exits (no traceback: the worker reports the line). External verifiers in any
language speak the same protocol (the ready frame is optional for them).
"""
from __future__ import annotations

import json
import os
import sys
import traceback

from rewards import budget
from rewards.api import VerifierError, resolve, run_one
from rewards.protocol import ANSWER_CLASSES, SCORE, ProtocolError, check_request, serve_requests, write_frame
from rewards.spawn import child_stdout
from rewards.verifiers import VERIFIERS, classes_of


def _error(request: dict, error: str) -> dict:
    return {"id": request.get("id"), "score": 0.0, "info": {}, "error": error}


def score(verifiers: dict, request: dict) -> dict:
    """A "score" request: the named verifier's score of the completion."""
    name = request["verifier"]
    if name not in verifiers:
        return _error(request, f"unknown verifier {name!r}")
    fn, args = verifiers[name]
    budget.start(request.get("timeout_s"))
    try:
        result = run_one(fn, request["completion"], request.get("fields") or {}, args)
    except Exception as e:  # the verifier's own failure (a KeyError included): reported, never fatal
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return _error(request, f"verifier {name!r} raised {tb[:2000]}")
    finally:
        budget.start(None)
    return {"id": request["id"], "score": result.value, "info": result.info, "error": None}


def answer_classes(verifiers: dict, request: dict) -> dict:
    """An "answer_classes" request: each list of answers grouped by the verifier's
    `answer_classes` (rewards/api.py); a verifier this process does not serve is looked
    up among the registered ones (the default grouping for any other name)."""
    name = request["verifier"]
    fn = verifiers[name][0] if name in verifiers else VERIFIERS.get(name)
    budget.start(request.get("timeout_s"))
    try:
        classes = [classes_of(fn)(answers) for answers in request["answers"]]
    except Exception as e:
        return _error(request, f"answer classes: {e!r}"[:2000])
    finally:
        budget.start(None)
    return {"id": request["id"], "score": 0.0, "info": {"classes": classes}, "error": None}


HANDLERS = {SCORE: score, ANSWER_CLASSES: answer_classes}
"""Request kind (rewards/protocol.py) -> its handler."""


def answer(verifiers: dict, request: dict) -> dict:
    try:
        check_request(request)
    except ProtocolError as e:
        return _error(request, f"protocol: {e}")
    handler = HANDLERS.get(request.get("kind", SCORE))
    if handler is None:  # an environment's kind (rewards/env_host.py serves those)
        return _error(request, f"a verifier process serves no {request['kind']!r} requests")
    return handler(verifiers, request)


def serve(specs: dict[str, dict], stdin, stdout) -> None:
    try:
        verifiers = {name: (resolve(spec["target"]), spec.get("args") or {}) for name, spec in specs.items()}
    except VerifierError as e:
        write_frame(stdout, {"ready": False, "error": str(e), "pid": os.getpid()})
        return
    write_frame(stdout, {"ready": True, "pid": os.getpid()})
    serve_requests(stdin, stdout, lambda request: answer(verifiers, request))


def main() -> None:
    specs = json.loads(sys.argv[1])
    serve(specs, sys.stdin.buffer, child_stdout())


if __name__ == "__main__":
    main()
