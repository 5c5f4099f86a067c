"""`grpo samples`: a run's recorded samples, laid out for a terminal: the prompt, the
completion with its <think> and <answer> parts set apart (and coloured on a terminal),
each verifier's score, the advantage. Model-written text never reaches the terminal
raw: control characters (escape sequences that could retitle or clear it) are shown
escaped."""
from __future__ import annotations

import re
import textwrap
import unicodedata
from typing import Any

_TAG = re.compile(r"(</?think>|</?answer>)")
_OBS, _END = "\033[36m", "\033[0m"
_COLORS = {"<think>": "\033[2m", "</think>": "\033[0m", "<answer>": "\033[1;32m", "</answer>": "\033[0m"}


def highlight(text: str, color: bool) -> str:
    if not color:
        return text
    return _TAG.sub(lambda m: (_COLORS[m.group(1)] + m.group(1) if m.group(1).startswith("<") and "/" not in m.group(1)
                               else m.group(1) + _COLORS[m.group(1)]), text)


def printable(text: str) -> str:
    """text with every control or format character but newline and tab escaped (\\x1b)."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co")
                   else c.encode("unicode_escape").decode("ascii") for c in text)


def show_sample(s: dict[str, Any], color: bool = False) -> str:
    scores = ", ".join(f"{name} {value:g}" for name, value in s["scores"].items())
    versions = "+".join(f"v{v}" for v, _ in s["versions"])
    state = "trained" if s["trained"] else f"dropped ({s['dropped']})"
    head = (f"step {s['step']} · prompt {s['key']} · sample {s['index'] + 1}/{s['n']} · reward {s['reward']:.3f} "
            f"({scores}) · advantage {s['advantage']:+.3f} · {s['finish_reason']} · {len(s['token_ids'])} tokens · "
            f"{versions} · {state}")
    width = 100
    body = episode_body(s["episode"], width, color) if "episode" in s else _fill(s["text"], width, "  ", color)
    errors = [f"  ! {name}: {printable(str(info['error']))}" for name, info in s["info"].items() if isinstance(info, dict) and info.get("error")]
    rule = "─" * min(width, len(head))
    what = "completion:" if "episode" not in s else episode_head(s["episode"])
    return "\n".join([rule, head, "prompt:", textwrap.indent(printable(s["prompt"]), "  "), what, body, *errors])


def _fill(text: str, width: int, indent: str, color: bool) -> str:
    return highlight(textwrap.fill(printable(text), width, initial_indent=indent, subsequent_indent=indent,
                                   replace_whitespace=False), color)


def episode_head(ep: dict[str, Any]) -> str:
    return (f"episode: {ep['turns']} model turn(s), {ep['tool_calls']} tool call(s), {ep['tool_errors']} tool "
            f"error(s), {ep['observation_tokens']} observation tokens (not trained on), ended: {ep['outcome']}, "
            f"environment reward {ep['env_reward']:g}" + (f", re-run {ep['reruns']}x" if ep["reruns"] else ""))


def episode_body(ep: dict[str, Any], width: int, color: bool) -> str:
    """An episode turn by turn: each model turn, then the observation that followed it,
    marked (and dimmed on a terminal) as the environment's, not the model's."""
    out, turn = [], 0
    for text, by_model in ep["segments"]:
        if by_model:
            turn += 1
            out += [f"  [model turn {turn}]", _fill(text, width, "    ", color)]
        else:
            label = "  [observation · from the environment · not trained on]"
            out += [f"{_OBS}{label}" if color else label, _fill(text, width, "    | ", False) + (_END if color else "")]
    return "\n".join(out)
