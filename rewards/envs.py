"""The environment contract (multi-turn episodes), and how a name becomes an environment.

THE CONTRACT (the one place it is written, beside the verifier contract in
rewards/api.py; tests/unit/test_envs.py checks every built-in against it):

    env = Env(**args)                 # one per episode: `env.args` from the config
    env.reset(row: dict) -> None      # the dataset row the episode's prompt came from
    env.step(turn: str) -> Step       # the text of one model turn -> what follows it
    env.close() -> None               # optional: the episode is over (or abandoned)

- `turn` is the text of the model's latest turn only (its tokens decoded), ending with
  the stop string that ended it, if any (`env.stop`).
- `Step.observation`: text to append before the model's next turn (None, or `done`,
  ends the episode). Its ids are tokenised on their own (rollout/tokens.py
  observation_ids): the conversation is never re-tokenised from text.
- `Step.done`: the episode is over; `Step.reward`: a reward of the environment's own,
  added to the configured verifiers' total over the whole episode (0.0 if it has none);
  `Step.info`: plain data, logged.
- Raising in `step` costs that turn an error observation, never the run.

An environment is named by its registered name (`ENVS`) or by an import path
`package.module:attr` (a class, instantiated per episode with `env.args`).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Step:
    observation: str | None
    done: bool = False
    reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> None: ...

    def step(self, turn: str) -> Step: ...


class EnvError(ValueError):
    """An environment named in the config that does not exist or cannot be imported."""


class PythonTool:
    """The model writes `<python>code</python>`; the code runs in the code sandbox
    (rewards/sandbox.py: a separate, killable process with resource limits, no secret of
    ours in its environment) and its output comes back as `<output>...</output>`,
    truncated to `max_output_chars`. A turn without a tool call ends the episode (the
    model has answered). A program that fails or hangs gets its error as the output."""

    CALL = re.compile(r"<python>(.*?)</python>", re.S)
    stop = ["</python>"]

    def __init__(self, timeout_s: float = 5.0, max_output_chars: int = 256, memory_mb: int = 256) -> None:
        if timeout_s <= 0 or max_output_chars < 1:
            raise ValueError(f"python tool: timeout_s ({timeout_s}) must be > 0 and max_output_chars "
                             f"({max_output_chars}) >= 1")
        self.timeout_s, self.max_output_chars, self.memory_mb = timeout_s, max_output_chars, memory_mb

    def reset(self, row: dict[str, Any]) -> None:
        self.row = row

    def step(self, turn: str) -> Step:
        calls = self.CALL.findall(turn)
        if not calls:
            return Step(None, done=True)
        from rewards.sandbox import run_program

        result = run_program(calls[-1], "", timeout_s=self.timeout_s, cpu_s=self.timeout_s, memory_mb=self.memory_mb)
        error = None
        if result["timed_out"]:
            error = f"timed out after {self.timeout_s:g} s"
        elif result["returncode"] != 0:
            lines = result["stderr"].strip().splitlines()
            error = lines[-1] if lines else f"exit status {result['returncode']}"
        text = result["stdout"] if error is None else f"error: {error}"
        if len(text) > self.max_output_chars:
            text = text[: self.max_output_chars] + "...(truncated)"
        return Step(f"<output>{text}</output>", info={"tool_call": 1, "tool_error": int(error is not None)})


ENVS: dict[str, type] = {"python": PythonTool}


def resolve_env(name: str) -> type:
    """Registered name or `package.module:attr` -> the environment class; else EnvError."""
    if ":" not in name:
        try:
            return ENVS[name]
        except KeyError:
            raise EnvError(f"env.name: unknown environment {name!r}; registered: {sorted(ENVS)}, "
                           f"or use package.module:attr") from None
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:
        raise EnvError(f"env.name: {name!r} cannot be imported: {type(e).__name__}: {e}") from None
    obj = getattr(module, attr, None)
    if not isinstance(obj, type) or not all(callable(getattr(obj, m, None)) for m in ("reset", "step")):
        raise EnvError(f"env.name: {name!r} is not an environment class with reset(row) and step(turn)")
    return obj


def start(name: str, row: dict[str, Any], args: dict[str, Any] | None = None) -> Environment:
    """One episode's environment, reset on its row."""
    env = resolve_env(name)(**(args or {}))
    env.reset(row)
    return env
