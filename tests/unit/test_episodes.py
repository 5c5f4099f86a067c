"""The episode conductor (cluster/flow/episodes.py) by hand, with a fake reward pool of
our own small interface: token in / token out, masks, seeds of re-runs, how episodes
end; the env.* config checks; the episode metrics; the episode view of `grpo samples`."""
import math

import pytest

from cluster.artifacts.metrics import episode_metrics
from cluster.commands.samples import show_sample
from cluster.flow.episodes import Conductor, EpisodeSettings
from rollout.seeds import derive_seed
from rollout.types import BoundaryError, Group, Sample

ROW = {"prompt": "3*4=", "answer": "12"}


class FakeWorker:
    def __init__(self):
        self.calls = []
        self.env_steps = self

    def remote(self, requests):
        self.calls.append(requests)
        return ("ref", len(self.calls))


class FakePool:
    def __init__(self, n=1):
        self.workers, self.up = [FakeWorker() for _ in range(n)], [True] * n


def turn(prompt_ids, ids, text, version=0, lp=-0.5):
    return Group(list(prompt_ids), "", {}, [Sample(list(ids), [lp] * len(ids), text, "stop", [(version, 0)], 0)])


def ok(episode, observation=None, done=False, reward=0.0, **info):
    return {"episode": episode, "kind": "ok", "observation": observation, "done": done, "reward": reward,
            "info": info, "error": None, "seconds": 0.25}


def conductor(**kw):
    s = EpisodeSettings(**{"max_turns": 3, "max_episode_tokens": 12, "stop": ["</t>"], "max_tokens": 8,
                           "max_attempts": 2, **kw})
    return Conductor(s, observe=lambda text: [90, 91])  # every observation: two tokens of its own


def answer(c, pool, results):
    """Send the outbox, answer its one call with `results` -> (turns, finished)."""
    c.flush(pool)
    [ref] = list(c.pending)
    return c.env_done(ref, results)


def test_two_turns_token_in_token_out_with_the_observation_masked():
    c, pool = conductor(), FakePool()
    [t1] = c.start(7, ROW, [11], {"temperature": 0.7}, True)
    assert t1.prompt_ids is None and t1.seed == 11  # the first turn: the prompt's own row and the sample's seed
    assert t1.sampling == {"temperature": 0.7, "stop": ["</t>"], "max_tokens": 8}
    assert c.turn_done(t1.episode, turn([1, 2], [3, 4, 5], "<t>a</t>"), "generator 0") == []
    c.flush(pool)
    assert pool.workers[0].calls == [[{"episode": t1.episode, "turn": "<t>a</t>", "row": ROW}]]
    [ref] = list(c.pending)
    turns, finished = c.env_done(ref, [ok(t1.episode, "<o>", reward=0.5, tool_call=1)])
    [t2] = turns
    assert finished == [] and t2.prompt_ids == [1, 2, 3, 4, 5, 90, 91]  # the exact ids so far, never re-tokenised
    assert t2.seed == derive_seed(11, "turn", 1, 0) != 11
    assert t2.sampling["max_tokens"] == 12 - 5  # what is left of the episode's token budget (< rollout.max_tokens)
    with pytest.raises(BoundaryError, match="re-tokenised"):  # the engine must have received exactly those ids
        c.turn_done(t2.episode, turn([1, 2, 3, 4, 5, 9091], [6], "b"), "generator 0")
    c.turn_done(t2.episode, turn(t2.prompt_ids, [6], "b", version=1), "generator 0")
    turns, finished = answer(c, pool, [ok(t1.episode, None, done=True, reward=0.25)])
    assert turns == [] and finished == [7]
    g = c.group(7, "episodes")
    [s] = g.samples
    assert s.completion_ids == [3, 4, 5, 90, 91, 6] and s.loss_mask == [1, 1, 1, 0, 0, 1]
    assert s.logprobs == [-0.5, -0.5, -0.5, 0.0, 0.0, -0.5] and s.text == "<t>a</t><o>b"
    assert s.versions == [(0, 0), (1, 5)] and s.version == 0  # staleness counts the oldest turn
    assert g.episode["turns"] == [2] and g.episode["env_reward"] == [0.75] and g.episode["tool_calls"] == [1]
    assert g.episode["segments"] == [[["<t>a</t>", 1], ["<o>", 0], ["b", 1]]] and g.episode["outcome"] == ["done"]
    assert g.episode["observation_tokens"] == [2] and g.episode["received"] == [[2, 7]]
    assert c.episodes == {} and c.by_parent == {}  # forgotten once handed on


def test_a_lost_environment_reruns_the_episode_with_new_seeds_then_gives_it_up():
    c, pool = conductor(max_attempts=2), FakePool()
    [t1] = c.start(3, ROW, [5], None, True)
    c.turn_done(t1.episode, turn([1], [2], "a"), "generator 0")
    c.flush(pool)
    [first] = list(c.pending)
    turns, _ = c.env_done(first, [{**ok(t1.episode), "kind": "lost"}])
    [again] = turns
    assert again.prompt_ids is None and again.seed == derive_seed(5, "turn", 0, 1)  # attempt 1 draws anew
    assert c.counts["reruns"] == 1
    c.turn_done(again.episode, turn([1], [4, 4], "cc"), "generator 0")
    c.flush(pool)
    [request] = pool.workers[0].calls[-1]
    assert request["row"] == ROW and request["episode"] == 1 << 32 | t1.episode  # a new environment, its own key
    [ref] = list(c.pending)
    c.pending[("late", 0)] = (0, [t1.episode], 0.0)  # attempt 0's answer arriving now is not attempt 1's
    assert c.env_done(("late", 0), [ok(t1.episode, "<stale>")]) == ([], [])
    turns, finished = c.env_done(ref, [{**ok(request["episode"]), "kind": "lost"}])
    assert turns == [] and finished == [3] and c.counts["abandoned"] == 1
    g = c.group(3, "episodes")
    assert g.episode["outcome"] == ["abandoned"] and g.episode["reruns"] == [1]
    assert g.samples[0].completion_ids == [4, 4]  # what the last attempt sampled


def test_bad_environment_output_costs_the_episode_never_the_run():
    c, pool = conductor(), FakePool()
    c.observe = lambda text: [] if not text else [90]
    [t] = c.start(1, ROW, [1], None, True)
    c.turn_done(t.episode, turn([1], [2], "a"), "generator 0")

    def empty(text):
        raise ValueError("no tokens")

    c.observe = empty
    turns, finished = answer(c, pool, [ok(t.episode, "", tool_call="yes", tool_error=float("nan"))])
    g = c.group(1, "e")
    assert finished == [1] and g.episode["outcome"] == ["error"] and g.episode["errors"] == [1]
    assert g.episode["tool_calls"] == [0] and g.episode["tool_errors"] == [0]


def test_an_episode_ends_on_a_timeout_on_max_turns_and_on_its_token_budget():
    c, pool = conductor(max_turns=1), FakePool()
    [t] = c.start(1, ROW, [1], None, True)
    c.turn_done(t.episode, turn([1], [2], "a"), "generator 0")
    c.flush(pool)
    assert pool.workers[0].calls[-1][0]["close"] is True  # the last turn: the environment is closed after it
    _, finished = c.env_done(list(c.pending)[0], [ok(t.episode, "<o>")])
    assert finished == [1] and c.group(1, "e").episode["outcome"] == ["max_turns"]

    c = conductor(max_episode_tokens=4)
    [t] = c.start(2, ROW, [1], None, True)
    c.turn_done(t.episode, turn([1], [2, 3], "a"), "generator 0")
    _, finished = answer(c, pool, [ok(t.episode, "<o>")])  # 2 + 2 observation tokens do not fit in 4
    g = c.group(2, "e")
    assert g.episode["outcome"] == ["max_tokens"] and g.samples[0].finish_reason == "length"

    c = conductor()
    [t] = c.start(4, ROW, [1], None, True)
    c.turn_done(t.episode, turn([1], [2], "a"), "generator 0")
    _, finished = answer(c, pool, [{**ok(t.episode), "kind": "timeout"}])
    assert finished == [4] and c.group(4, "e").episode["timeouts"] == [1]


def test_a_non_finite_environment_reward_never_travels_on():
    c, pool = conductor(), FakePool()
    [t] = c.start(1, ROW, [1], None, True)
    c.turn_done(t.episode, turn([1], [2], "a"), "generator 0")
    with pytest.raises(BoundaryError, match="non-finite environment reward"):
        answer(c, pool, [ok(t.episode, "<o>", reward=math.nan)])


@pytest.mark.parametrize("overrides, message", [
    (["env.name=nope"], "env.name: unknown environment 'nope'"),
    (["env.name=python", "rollout.max_tokens=64", "env.max_episode_tokens=32"], "env.max_episode_tokens (32)"),
    (["env.name=python", "env.stop=['']"], "env.stop"),
    (["env.external={command: [x]}"], "env.external needs env.name"),
])
def test_bad_env_settings_are_refused_at_load_naming_the_field(overrides, message):
    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_the_environment_is_checked_before_any_actor_starts(tmp_path):
    import sys

    from cluster.config import load_config
    from rewards.api import VerifierError
    from rewards.worker import preflight_env
    from tests.helpers import EXAMPLES

    preflight_env(load_config(None, ["env.name=python"]).env)
    with pytest.raises(VerifierError, match="env.args"):
        preflight_env(load_config(None, ["env.name=python", "env.args={timeout_s: -1}"]).env)
    with pytest.raises(VerifierError, match="cannot be imported"):
        preflight_env(load_config(None, ["env.name=no_such_module:Env"]).env)
    good = f"env.external={{command: [{sys.executable}, {EXAMPLES / 'retry_env.py'}]}}"
    preflight_env(load_config(None, ["env.name=retry", good]).env)  # the example answers the probe
    with pytest.raises(VerifierError, match="external environment 'dead'"):
        preflight_env(load_config(None, ["env.name=dead", f"env.external={{command: [{sys.executable}, -c, '1']}}",
                                         "env.timeout_s=5"]).env)


def test_episode_metrics_by_hand_and_none_for_single_turn_groups():
    g = Group([1], "", {}, [Sample([1], [0.0], "a", "stop", [(0, 0)])] * 2, rewards=[0.0, 0.0])
    assert episode_metrics([g]) == {}
    g.episode = {"turns": [1, 3], "tool_calls": [0, 2], "tool_errors": [0, 1], "observation_tokens": [0, 10],
                 "reruns": [1, 0], "timeouts": [0, 0], "errors": [0, 0], "env_reward": [0.5, 0.0],
                 "env_seconds": [0.5, 1.5], "outcome": ["done", "max_turns"]}
    m = episode_metrics([g])
    assert m["env/turns"] == 2.0 and m["env/tool_calls"] == 1.0 and m["env/observation_tokens"] == 5.0
    assert m["env/tool_errors"] == 1 and m["env/reruns"] == 1 and m["env/reward"] == 0.25 and m["time/env"] == 2.0
    assert m["env/outcome_done"] == 0.5 and m["env/outcome_max_turns"] == 0.5 and m["env/outcome_timeout"] == 0.0


def test_grpo_samples_shows_an_episode_turn_by_turn():
    item = {"step": 1, "key": 0, "index": 0, "n": 1, "reward": 1.0, "advantage": 0.5, "scores": {"accuracy": 1.0},
            "finish_reason": "stop", "token_ids": [1] * 9, "versions": [[0, 0]], "trained": True, "dropped": None,
            "prompt": "3*4=", "info": {}, "text": "<python>print(3*4)</python><output>12\x1b[2J</output><answer>12</answer>",
            "episode": {"segments": [["<python>print(3*4)</python>", 1], ["<output>12\x1b[2J</output>", 0],
                                     ["<answer>12</answer>", 1]], "turns": 2, "tool_calls": 1, "tool_errors": 0,
                        "observation_tokens": 4, "outcome": "done", "env_reward": 0.0, "reruns": 0}}
    out = show_sample(item)
    lines = out.splitlines()
    at = lines.index("  [observation · from the environment · not trained on]")
    assert lines[at - 2] == "  [model turn 1]" and lines[at + 2] == "  [model turn 2]"
    assert lines[at + 1] == "    | <output>12\\x1b[2J</output>"  # model-written control characters shown escaped
    assert "episode: 2 model turn(s), 1 tool call(s)" in out and "\x1b" not in out


def test_a_malformed_step_is_that_turns_error_observation_and_the_process_serves_on():
    from rewards.env_host import answer as serve_one
    from rewards.envs import Step

    class Odd:
        def reset(self, row):
            pass

        def step(self, turn):
            return {"text": "a Step this is not"} if turn == "dict" else Step(7 if turn == "int" else "ok", info={1: b"x"})

    episodes = {}
    assert serve_one(Odd, {}, episodes, {"id": 1, "verifier": "odd", "kind": "reset", "episode": 5, "row": {}})["error"] is None
    for turn, why in (("dict", "AttributeError"), ("int", "must be a str or None, not int")):
        r = serve_one(Odd, {}, episodes, {"id": 2, "verifier": "odd", "kind": "step", "episode": 5, "turn": turn})
        assert r["error"] is None and why in r["info"]["observation"] and r["info"]["info"]["tool_error"] == 1
    r = serve_one(Odd, {}, episodes, {"id": 3, "verifier": "odd", "kind": "step", "episode": 5, "turn": "fine"})
    assert r["info"] == {"observation": "ok", "done": False, "info": {"1": "x"}}  # plain data only


def test_the_multiplication_task_and_its_tool_cold_start_targets(tmp_path):
    """data.task=multiplication: a*b rows; with the python tool, the cold start's target is
    an episode whose observation (exactly what the tool prints) carries no loss."""
    from cluster.commands.sft import tokenize
    from cluster.config import load_config
    from cluster.data import arithmetic_split
    from learner.config import TinyModelConfig
    from learner.tiny_model import build_tiny_model
    from rewards.envs import PythonTool

    data = load_config(None, ["data.task=multiplication", "data.max_operand=99"]).data
    split = arithmetic_split(data)
    assert sum(map(len, split.values())) == 100 * 100 and split == arithmetic_split(data)
    row = split["sft"][0]
    a, b = map(int, row["prompt"][:-1].split("*"))
    assert row["answer"] == str(a * b) and row["reference"] == f"<answer>{a * b}</answer>"
    (call, _), (output, by_model), _ = row["tool_reference"]
    assert by_model == 0 and PythonTool().step(call).observation == output  # the tool's own answer, to the byte
    model = build_tiny_model(tmp_path / "m", TinyModelConfig(seed=1))
    [(prompt, ids, mask), (_, plain_ids)] = tokenize(str(model), [(row["prompt"], row["tool_reference"]),
                                                                  (row["prompt"], row["reference"])])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    hidden = [t for t, m in zip(ids, mask) if not m]
    assert hidden == tok(output, add_special_tokens=False)["input_ids"] and len(mask) == len(ids)
    assert mask.index(0) == len(tok(call, add_special_tokens=False)["input_ids"])
    assert ids[-1] == plain_ids[-1] == tok.eos_token_id and tok.decode(plain_ids[:-1]) == row["reference"]


def test_the_cold_start_cache_key_covers_what_shapes_the_model():
    """Two jobs share a cold-started model only when it would be the same model: the
    sampling temperature (the SFT loss is taken at it), the task and the tool change it;
    RL-only settings do not."""
    from cluster.commands.cold_start import cold_start_key
    from cluster.config import load_config

    def key(*overrides):
        return cold_start_key(load_config(None, list(overrides)))

    base = key()
    assert key("rollout.n=4", "run.prompts_per_step=8", "env.name=retry",
               "env.external={command: [x]}") == base  # RL only: the same cold start
    assert key("rollout.temperature=0.7") != base
    assert len({base, key("data.task=multiplication"), key("data.task=multiplication", "env.name=python")}) == 3
