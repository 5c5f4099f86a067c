"""Recorded rollouts: every group a step sampled (trained on or dropped), as msgpack,
to inspect (`grpo samples`) and to replay the learner on (`grpo replay`).

RUN/rollouts/step-NNNNNN.msgpack, one file per step, is one msgpack map:

    {"format": "grpo-rollouts/1", "step": int (1-based), "policy_version_trained": int,
     "groups": [{"key": int (position in the prompt stream), "prompt": str,
                 "prompt_ids": [int], "row": map (the dataset row), "trained": bool,
                 "dropped": str | nil (why not trained: "no_signal", "stale"),
                 "samples": [{"text": str, "token_ids": [int], "logprobs": [float]
                              (behaviour policy, per token), "finish_reason": str,
                              "versions": [[version, first token index], ...], "seed": int,
                              "loss_mask": [0 | 1] (only where some token was not sampled),
                              "reward": float, "advantage": float,
                              "scores": {verifier: float}, "info": {verifier: map},
                              "episode": map (multi-turn only, below)}]}]}

A multi-turn sample (env.name set) is one episode: its token_ids are every model turn
and observation in order, loss_mask 0 on the observations, and "episode" holds
{"segments": [[text, 1 (model turn) | 0 (observation)], ...] (their texts joined are
"text"), "turns": int, "outcome": str, "tool_calls": int, "tool_errors": int,
"observation_tokens": int, "reruns": int, "env_reward": float, "env_seconds": float}.

Plain msgpack only: any language can read it, and nothing is ever unpickled. The
directory is kept under `run.record_max_mb` by deleting the oldest steps.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import msgpack

from cluster.artifacts.files import write_atomic
from rollout.types import Group, Sample

FORMAT = "grpo-rollouts/1"


EPISODE_FIELDS = ("segments", "turns", "outcome", "tool_calls", "tool_errors", "observation_tokens", "reruns",
                  "env_reward", "env_seconds")


def _episode(g: Group, i: int) -> dict[str, Any]:
    """Sample i's episode, as recorded (nothing for a single-turn group)."""
    if g.episode is None:
        return {}
    return {"episode": {k: g.episode[k][i] for k in EPISODE_FIELDS}}


def group_record(g: Group, advantages: list[float], trained: bool, dropped: str | None) -> dict[str, Any]:
    verifiers = list(g.reward_parts or {})
    return {
        "key": g.key, "prompt": g.prompt, "prompt_ids": list(g.prompt_ids),
        "row": {k: v for k, v in g.row.items() if _plain(v)}, "trained": trained, "dropped": dropped,
        "samples": [{
            "text": s.text, "token_ids": list(s.completion_ids), "logprobs": list(s.logprobs),
            "finish_reason": s.finish_reason, "versions": [list(v) for v in s.versions], "seed": s.seed,
            **({} if s.loss_mask is None else {"loss_mask": list(s.loss_mask)}),
            "reward": g.rewards[i], "advantage": advantages[i],
            "scores": {v: g.reward_parts[v][i] for v in verifiers},
            "info": {v: (g.reward_info or {}).get(v, [{}] * len(g.samples))[i] for v in verifiers},
            **_episode(g, i),
        } for i, s in enumerate(g.samples)],
    }


def batch_records(sampled: list[Group], trained: list[Group], dropped: dict[int, str],
                  advantage: str, eps: float) -> list[dict[str, Any]]:
    """A step's records: advantages recomputed with the learner's own estimator over the
    trained groups (batch-level estimators need all of them); dropped groups get 0."""
    advantages: dict[int, list[float]] = {}
    if trained:
        import torch

        from learner import algos

        rewards = torch.tensor([g.rewards for g in trained], dtype=torch.float64)
        adv = algos.lookup(algos.ADVANTAGES, advantage, "advantage estimator")(rewards, eps)
        advantages = {g.key: adv[i].tolist() for i, g in enumerate(trained)}
    return [group_record(g, advantages.get(g.key, [0.0] * len(g.samples)), g.key in advantages, dropped.get(g.key))
            for g in sampled]


def _plain(value: Any) -> bool:
    try:
        msgpack.packb(value, use_bin_type=True)
        return True
    except (TypeError, ValueError, OverflowError):
        return False


class Recorder:
    def __init__(self, run_dir: Path, max_mb: float) -> None:
        self.dir = run_dir / "rollouts"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_mb * 2**20)

    def write(self, step: int, version: int, groups: list[dict[str, Any]]) -> Path:
        path = self.dir / f"step-{step:06d}.msgpack"
        body = msgpack.packb({"format": FORMAT, "step": step, "policy_version_trained": version, "groups": groups},
                             use_bin_type=True)
        write_atomic(path, body)
        self._bound()
        return path

    def truncate(self, step: int) -> None:
        """Forget the steps after `step` (they are done again after a learner restart)."""
        for s, path in step_files(self.dir.parent):
            if s > step:
                path.unlink()

    def _bound(self) -> None:
        files = [path for _, path in step_files(self.dir.parent)]
        total = sum(f.stat().st_size for f in files)
        while files and total > self.max_bytes and len(files) > 1:
            total -= files[0].stat().st_size
            files.pop(0).unlink()


def read_step(path: Path) -> dict[str, Any]:
    """A step's record, or ValueError naming the file (truncated, empty, not ours)."""
    try:
        data = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    except (OSError, ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError,
            msgpack.exceptions.StackError) as e:
        raise ValueError(f"{path}: not a readable rollout record ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("groups"), list):
        raise ValueError(f"{path}: not a {FORMAT} file")
    return data


def step_files(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, file) of every record in RUN/rollouts, by step; files not named
    step-<number>.msgpack are not records and are ignored."""
    out = []
    for path in (run_dir / "rollouts").glob("step-*.msgpack"):
        number = path.stem.split("-", 1)[1]
        if number.isdigit():
            out.append((int(number), path))
    return sorted(out)


def steps(run_dir: Path) -> list[int]:
    return [s for s, _ in step_files(run_dir)]


def load(run_dir: Path, step: int) -> dict[str, Any]:
    path = run_dir / "rollouts" / f"step-{step:06d}.msgpack"
    if not path.is_file():
        have = steps(run_dir)
        raise FileNotFoundError(f"no recorded rollouts for step {step} in {run_dir / 'rollouts'} "
                                f"(recorded: {have[0]}..{have[-1]})" if have else f"no recorded rollouts in {run_dir}")
    return read_step(path)


def to_groups(record: dict[str, Any], trained_only: bool = True) -> list[Group]:
    """A recorded step -> the Groups the learner trained on (as the learner saw them);
    a record missing a field raises ValueError naming the step."""
    try:
        return _groups(record, trained_only)
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"the record of step {record.get('step')} is malformed ({type(e).__name__}: {e})") from None


def _groups(record: dict[str, Any], trained_only: bool) -> list[Group]:
    out = []
    for g in record["groups"]:
        if trained_only and not g["trained"]:
            continue
        samples = [Sample(s["token_ids"], s["logprobs"], s["text"], s["finish_reason"],
                          [tuple(v) for v in s["versions"]], s["seed"], s.get("loss_mask")) for s in g["samples"]]
        out.append(Group(g["prompt_ids"], g["prompt"], g["row"], samples, rewards=[s["reward"] for s in g["samples"]],
                         reward_parts={v: [s["scores"][v] for s in g["samples"]] for v in g["samples"][0]["scores"]},
                         reward_stats={"timeouts": 0, "errors": 0, "cache_hits": 0}, key=g["key"]))
    return out


def select(run_dir: Path, step: int | None, mode: str, count: int, verifier: str | None,
           seed: int = 0) -> Iterator[dict[str, Any]]:
    """Samples of one step (default: the last recorded), with their group's context,
    sorted by reward (best/worst) or drawn at random."""
    if count < 1:
        raise ValueError(f"the number of samples to show must be at least 1 (got {count})")
    have = steps(run_dir)
    if not have:
        raise FileNotFoundError(f"no recorded rollouts in {run_dir / 'rollouts'} (run.record_rollouts)")
    record = load(run_dir, step if step is not None else have[-1])
    items = [{"step": record["step"], "key": g["key"], "prompt": g["prompt"], "trained": g["trained"],
              "dropped": g["dropped"], "index": i, "n": len(g["samples"]), **s}
             for g in record["groups"] for i, s in enumerate(g["samples"])]

    def score(item: dict[str, Any]) -> float:
        return item["scores"][verifier] if verifier else item["reward"]

    if verifier and items and verifier not in items[0]["scores"]:
        raise ValueError(f"--verifier {verifier!r}: the run's verifiers are {sorted(items[0]['scores'])}")
    if mode == "best":
        items.sort(key=lambda x: -score(x))
    elif mode == "worst":
        items.sort(key=score)
    else:
        random.Random(seed).shuffle(items)
    return iter(items[:count])
