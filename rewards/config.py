"""Config section owned by rewards/. Imports only pydantic: cheap to import."""
from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from rollout.config import Section

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets: `[::1]:9000`) -> (host, port); ValueError
    when it is not one."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not host:port (a port from 1 to 65535)")
    return host, int(port)


def _env_names(names: list[str]) -> list[str]:
    bad = [n for n in names if not _ENV_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"not names of environment variables: {bad}")
    return names


class VerifierSpec(Section):
    weight: float = 1.0
    """Weight of this verifier's score in the total reward."""
    args: dict[str, Any] = {}
    """Keyword arguments passed to the verifier on every call."""
    timeout_s: float | None = Field(None, gt=0)
    """Wall-clock limit of one call (default: rewards.timeout_s)."""
    env: list[str] = []
    """Names of environment variables of the reward worker that the verifier process
    gets, with the worker's values (an API key a plug-in needs). Nothing else of the
    worker's environment crosses: a verifier process starts from PATH, the locale, TZ,
    TMPDIR, VIRTUAL_ENV, the thread-count variables, a fresh empty HOME and a PYTHONPATH
    that imports the project and the plug-ins (rewards/spawn.py). The verifiers that run
    in Python share one process, which gets the names of all of them. Never reaches a
    program the `code` verifier runs."""

    @field_validator("env")
    @classmethod
    def _env(cls, value: list[str]) -> list[str]:
        return _env_names(value)


class ExternalVerifier(Section):
    """A verifier outside Python's reach: a program speaking length-prefixed msgpack
    on stdin/stdout (`command`) or a TCP server speaking it (`address`)."""

    command: list[str] | None = None
    """The program and its arguments (not empty)."""
    address: str | None = None
    """host:port"""
    verifier: str | None = None
    """The name sent in requests (default: this entry's name)."""
    ready: bool = False
    """The program writes one {"ready": true} frame when it can serve (command only):
    its start-up then never counts against a call's timeout."""
    env: list[str] = []
    """Names of environment variables of the reward worker that the program gets, with
    the worker's values. It starts from PATH, the locale, TZ, TMPDIR, VIRTUAL_ENV, the
    thread-count variables and a fresh empty HOME; nothing else crosses (no PYTHONPATH:
    it may be another Python)."""

    @field_validator("env")
    @classmethod
    def _env(cls, value: list[str]) -> list[str]:
        return _env_names(value)

    @model_validator(mode="after")
    def _one(self) -> "ExternalVerifier":
        if (self.command is None) == (self.address is None):
            raise ValueError("set exactly one of command or address")
        if self.command is not None and (not self.command or not self.command[0]):
            raise ValueError("command is empty: give the program (and its arguments)")
        if self.address is not None:
            split_address(self.address)
        return self


class RewardConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Reward-worker actors; groups are spread over all of them as they arrive."""
    concurrency: int = Field(2, ge=1)
    """Verifier processes per worker (each an own set of external peers too): the
    samples of the groups a worker holds are scored this many at a time."""
    verifiers: dict[str, float | VerifierSpec] = {"accuracy": 1.0, "format": 0.2}
    """Verifier -> weight, or -> {weight, args, timeout_s, env}. A verifier is a registered
    name (rewards/verifiers.py), a `package.module:attr` import path, or a name under
    `external`. The total reward is the weighted sum; each score is logged as rewards/<name>."""
    external: dict[str, ExternalVerifier] = {}
    """External verifier programs or servers, by the name used in `verifiers`."""
    timeout_s: float = Field(10.0, gt=0)
    """Wall-clock limit of one verifier call: past it the process is killed and replaced,
    and the sample scores 0 (counted in reward/timeouts)."""
    memory_mb: int = Field(4096, ge=64)
    """Address-space limit of each verifier process."""
    cache_size: int = Field(100_000, ge=0)
    """Scores remembered per worker, keyed by (verifier, completion, fields)."""
    allow_unsandboxed_code: bool = False
    """Let the `code` verifier run model-written programs without bubblewrap (process
    limits, a PID namespace or cgroup, uid 65534 when the worker is root, but no
    filesystem isolation). Off: a machine without bubblewrap refuses to run them (every
    such sample scores 0 with an error saying why)."""
    max_error_steps: int = Field(3, ge=0)
    """Stop the run when one verifier fails (an error or a timeout) on every sample of
    this many consecutive steps, naming it and its last error (rewards.api.ErrorStreak).
    One such step can be a passing outage (a verifier server restarting, a node lost);
    three in a row means the verifier is broken and the run learns from zeros. 0: never."""

    @field_validator("verifiers")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("at least one verifier is needed")
        return value

    @model_validator(mode="after")
    def _known(self) -> "RewardConfig":
        from rewards.verifiers import VERIFIERS

        for name in self.verifiers:
            if name not in VERIFIERS and name not in self.external and ":" not in name:
                raise ValueError(
                    f"verifiers.{name}: unknown verifier; registered: {sorted(VERIFIERS)}, "
                    "an import path package.module:attr, or a name under rewards.external"
                )
        return self

    def spec(self, name: str) -> VerifierSpec:
        value = self.verifiers[name]
        return value if isinstance(value, VerifierSpec) else VerifierSpec(weight=value)


class EnvConfig(Section):
    """Multi-turn episodes (README, Environments and tools): the model writes a turn, an
    environment answers with an observation that is appended, the model goes on. `name`
    unset: single-turn sampling, as without this section."""

    name: str | None = None
    """A registered environment (rewards/envs.py ENVS: `python`), a `package.module:attr`
    import path, or the label of the `external` program or server."""
    max_turns: int = Field(4, ge=1)
    """Model turns per episode; the last one's observation, if any, is not appended."""
    max_episode_tokens: int = Field(256, ge=2)
    """Tokens after the prompt (model turns and observations): each turn samples at most
    what is left (and rollout.max_tokens); an observation that does not fit ends the episode."""
    stop: list[str] | None = None
    """Strings that end a model turn (kept in it), e.g. `</python>`; None: the
    environment's own (`stop` of its class; none for an external one)."""
    timeout_s: float = Field(30.0, gt=0)
    """Wall-clock limit of one environment call (reset + step); past it the environment
    process is killed and the episode ends where it is (counted in env/timeouts)."""
    args: dict[str, Any] = {}
    """Keyword arguments of the environment class, one instance per episode."""
    external: ExternalVerifier | None = None
    """An environment outside Python's reach: a program (stdio) or server (TCP) speaking
    the verifiers' msgpack frames with the reset/step/close kinds (rewards/protocol.py)."""
    max_attempts: int = Field(3, ge=1)
    """Runs of one episode when its environment is lost mid-episode (a crashed process, a
    lost reward worker): it is re-run from its first turn with new seeds (counted in
    env/reruns); past this it ends where it is (env/abandoned)."""

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("env.stop: every stop string must be non-empty")
        return value

    @model_validator(mode="after")
    def _known(self) -> "EnvConfig":
        from rewards.envs import ENVS

        if self.name is None:
            if self.external is not None:
                raise ValueError("env.external needs env.name (the label sent in its requests)")
            return self
        if self.external is None and self.name not in ENVS and ":" not in self.name:
            raise ValueError(f"env.name: unknown environment {self.name!r}; registered: {sorted(ENVS)}, an import "
                             "path package.module:attr, or set env.external")
        return self

    def turn_stop(self) -> list[str]:
        """The stop strings of a model turn (the class's own when env.stop is unset)."""
        if self.stop is not None or self.external is not None:
            return list(self.stop or [])
        from rewards.envs import resolve_env

        return list(getattr(resolve_env(self.name), "stop", None) or [])
