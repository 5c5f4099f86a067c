"""`grpo verify`: run one verifier over cases from the shell, exactly as the reward
workers do (in a separate, killable process with the same timeout)."""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator, TextIO

from pydantic import ValidationError

from rewards.config import RewardConfig
from rewards.worker import RewardWorker


class CaseError(ValueError):
    pass


def parse_field(item: str) -> tuple[str, Any]:
    """`key=value`; the value is read as JSON when it parses, else kept as text."""
    if "=" not in item:
        raise CaseError(f"--field {item!r} is not key=value")
    key, raw = item.split("=", 1)
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def read_cases(stream: TextIO, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for lineno, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaseError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str):
            raise CaseError(f"{source}:{lineno}: each line must be an object with a string 'completion'")
        completion = row.pop("completion")
        yield completion, row


def run(verifier: str, cases: Iterator[tuple[str, dict[str, Any]]], out: TextIO,
        args: dict[str, Any], timeout_s: float | None, external: dict[str, Any]) -> int:
    """Writes one JSON line per case, in order. -> the number of cases.
    `timeout_s` None: the config's default (rewards.timeout_s)."""
    limit = {} if timeout_s is None else {"timeout_s": timeout_s}
    cfg = RewardConfig(verifiers={verifier: {"weight": 1.0, "args": args}}, external=external,
                       cache_size=0, concurrency=1, **limit)
    worker = RewardWorker(cfg)
    count = 0
    try:
        for completion, fields in cases:
            result = worker.verify(verifier, completion, fields)
            out.write(json.dumps({"score": result["score"], "error": result["error"], "info": result["info"]}) + "\n")
            out.flush()
            count += 1
    finally:
        worker.close()
    return count


def main(args) -> int:
    try:
        extra = json.loads(args.args) if args.args else {}
        external = json.loads(args.external) if args.external else {}
        if args.input is not None:
            stream = sys.stdin if args.input == "-" else open(args.input)
            cases = read_cases(stream, args.input)
        elif args.completion is not None:
            cases = iter([(args.completion, dict(parse_field(f) for f in args.field))])
        else:
            raise CaseError("give --input FILE (JSONL, '-' for stdin) or --completion TEXT")
        out = open(args.output, "w") if args.output else sys.stdout
        with out if args.output else contextlib.nullcontext(out):
            n = run(args.verifier, cases, out, extra, args.timeout, external)
    except ValidationError as e:
        print(f"grpo verify: {'; '.join(err['msg'] for err in e.errors())}", file=sys.stderr)
        return 2
    except (CaseError, ValueError, OSError) as e:
        print(f"grpo verify: {e}", file=sys.stderr)
        return 2
    if args.output:
        print(f"grpo verify: {n} cases scored -> {args.output}", file=sys.stderr)
    return 0

