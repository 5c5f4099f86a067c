"""Multi-turn episodes through the real stack: a vLLM generator actor, reward workers
running the environment in their own processes (rewards/env_host.py), the DeepSpeed
learner; the conductor of cluster/flow/episodes.py driving each episode, on the tiny
byte-level BPE chat tokenizer (where re-tokenising joined text merges tokens)."""
import numpy as np
import pytest
import ray

from cluster.actors.factory import ActorFactory
from cluster.data import PromptStream
from cluster.flow.episodes import observer
from cluster.flow.pipeline import PipelineSettings, RolloutPipeline
from cluster.flow.episodes import episode_settings
from rollout.seeds import sample_seeds
from rollout.tokens import observation_ids
from tests.helpers import hf_logprobs, placed

OBS = "ing the<output>42</output>"
ROWS = [{"prompt": f"{a}*{b}=", "answer": str(a * b)} for a, b in [(3, 4), (12, 7), (5, 9)]]


def start(path, env_overrides, n=2):
    cfg = placed(["rollout.n=%d" % n, "rollout.max_tokens=8", "rollout.temperature=1.0", "learner.lr=0.05",
                  "rewards.verifiers={accuracy: 1.0}", "rewards.num_workers=1", "env.max_turns=3",
                  "env.max_episode_tokens=40", "env.timeout_s=5", "faults.health_timeout_s=5", *env_overrides])
    factory = ActorFactory.for_job(cfg, str(path))
    return cfg, factory


def side(cfg, gens, workers, tok, sup=None):
    s = PipelineSettings(prompts_per_step=0, n=cfg.rollout.n, max_staleness=0, dynamic_sampling=False,
                         max_sampling_rounds=1, seed=0, total_steps=0, reward_deadline_s=60.0,
                         episodes=episode_settings(cfg))
    return RolloutPipeline(gens, workers, PromptStream([], 0), s, log=lambda m: None, faults=sup,
                           observe=observer(tok, "none"))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from transformers import AutoTokenizer

    from learner.config import TinyModelConfig
    from learner.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("episodes") / "m", TinyModelConfig(tokenizer="chat_bpe", seed=5))
    return path, AutoTokenizer.from_pretrained(str(path))


def check_episode(g, s, tok, state, path, temperature):
    """Two model turns and one observation, token in, token out; logprobs the learner's."""
    obs = observation_ids(tok, OBS, "none")
    mask = np.array(s.loss_mask)
    starts = np.flatnonzero(np.diff(np.r_[1, mask, 1]))  # where the run of zeros (the observation) begins and ends
    assert len(starts) == 2, s.loss_mask
    a, b = starts
    assert mask[:a].all() and mask[b:].all() and b - a == len(obs) and a > 0 and b < len(mask)
    assert s.completion_ids[a:b] == obs  # appended as tokenised on its own
    ids = g.prompt_ids + s.completion_ids
    expected = hf_logprobs(path, state, ids, temperature)[len(g.prompt_ids) - 1:]
    got = np.array(s.logprobs)
    assert np.abs(got[mask == 1] - expected[mask == 1]).max() < 1e-4  # sampled with these logprobs
    assert (got[mask == 0] == 0.0).all()
    return ids


def test_an_episode_is_sampled_token_in_token_out_and_the_learner_agrees(ray_session, chat_model):
    path, tok = chat_model
    cfg, factory = start(path, ["env.name=tests.reward_plugins:TwoTurns"])
    gens, workers, learners = factory.generators(), factory.reward_workers(), factory.learner_group()
    ray.get([a.ready.remote() for a in gens + workers + learners.ranks])
    learners.connect(gens)
    pipe = side(cfg, gens, workers, tok)
    seeds = [sample_seeds(0, "train", i, 2) for i in range(len(ROWS))]
    sampling = {"temperature": 1.0, "top_p": 1.0}
    before = pipe.sample(ROWS, seeds, sampling, timeout_s=120)
    for g in before:
        assert g.episode["turns"] == [2, 2] and g.episode["outcome"] == ["done", "done"]
        assert g.episode["tool_calls"] == [1, 1] and g.reward_parts["env"] == g.episode["env_reward"]
        assert g.rewards == [acc + env for acc, env in zip(g.reward_parts["accuracy"], g.episode["env_reward"])]
    state0 = ray.get(learners.ranks[0].state_dict_numpy.remote())
    # a GRPO update on the episodes themselves (observation tokens masked out), pushed
    assert len({r for g in before for r in g.rewards}) > 1
    stats = learners.train(before, version=0)
    assert np.isfinite(stats["train/loss"])
    learners.push(1)
    state1 = ray.get(learners.ranks[0].state_dict_numpy.remote())
    moved = max(np.abs(hf_logprobs(path, state1, ids) - hf_logprobs(path, state0, ids)).max()
                for ids in [g.prompt_ids + s.completion_ids for g in before for s in g.samples])
    assert moved > 1e-2
    retokenised = 0
    for temperature in (1.0, 0.7):
        after = pipe.sample(ROWS, seeds, {"temperature": temperature, "top_p": 1.0}, timeout_s=120)
        for g in after:
            for s in g.samples:
                assert s.versions[0][0] == 1 and s.finish_reason in ("stop", "length")
                ids = check_episode(g, s, tok, state1, path, temperature)
                text = tok.decode(ids[len(g.prompt_ids):])
                retokenised += tok(text, add_special_tokens=False)["input_ids"] != s.completion_ids
                # vLLM received, for turn 2, exactly turn 1's prompt, its completion and the observation
                assert g.episode["received"][g.samples.index(s)] == [len(g.prompt_ids), len(g.prompt_ids)
                                                                     + s.loss_mask.index(0) + len(OBS_IDS(tok))]
    learner_lp = ray.get(learners.ranks[0].sequence_logprobs.remote(ids))  # the learner's own forward, T=1
    assert np.abs(np.array(learner_lp) - hf_logprobs(path, state1, ids)).max() < 1e-4
    assert retokenised > 0  # re-tokenising the conversation from text would have trained on other tokens
    pipe.close()
    for a in gens + workers + learners.ranks:
        ray.kill(a)


def OBS_IDS(tok):
    return observation_ids(tok, OBS, "none")


def test_chaos_an_environment_process_dies_a_tool_call_and_a_step_hang(ray_session, chat_model, tmp_path):
    """The environment process dies mid-episode (its episodes are re-run), a tool call hangs
    in the sandbox (an error observation), an environment step hangs past env.timeout_s
    (the episode ends where it is): every prompt still comes back, each counted."""
    from cluster.actors.supervisor import Supervisor

    path, tok = chat_model
    cfg, factory = start(path, ["env.name=tests.reward_plugins:Chaos", f"env.args={{marker: {tmp_path / 'died'}}}",
                                "env.timeout_s=3", "env.max_attempts=6", "rewards.concurrency=1"])
    gens, workers = factory.generators(), factory.reward_workers()
    ray.get([a.ready.remote() for a in gens + workers])
    sup = Supervisor(cfg.faults, cfg.cluster.start_timeout_s, factory, gens, None, 0, lambda m: None)
    try:
        pipe = side(cfg, gens, workers, tok, sup)
        rows = [dict(ROWS[0], case="hang_tool"), dict(ROWS[1]), dict(ROWS[2], case="hang_step")]
        groups = pipe.sample(rows, [sample_seeds(0, "eval", i, 2) for i in range(3)], {"top_p": 1.0}, timeout_s=180)
        assert [len(g.samples) for g in groups] == [2, 2, 2]
        ep = [g.episode for g in groups]
        assert (tmp_path / "died").exists() and pipe.episodes.counts["reruns"] >= 1
        assert sum(sum(e["reruns"]) for e in ep) == pipe.episodes.counts["reruns"]
        assert ep[0]["tool_errors"] == [1, 1]  # the hung tool call: an error observation, and the episode went on
        assert ep[0]["turns"] == [2, 2] and ep[0]["outcome"] == ["done", "done"]
        assert "timed out" in groups[0].samples[0].text
        assert ep[2]["outcome"] == ["timeout", "timeout"] and ep[2]["timeouts"] == [1, 1] and ep[2]["turns"] == [2, 2]
        assert ep[1]["outcome"] == ["done", "done"]
        pipe.close()
    finally:
        sup.close()  # its probe thread must not call Ray after the module's Ray is shut down


def test_a_generator_lost_mid_episode_has_its_turns_sampled_again(ray_session, chat_model):
    """The generator is killed once some episodes are past their first turn: the
    supervisor replaces it, the turns it held are sampled again (same seeds, the same ids
    in), and every episode still ends whole, token in / token out."""
    import threading
    import time

    from cluster.actors.supervisor import Supervisor

    path, tok = chat_model
    cfg, factory = start(path, ["env.name=tests.reward_plugins:TwoTurns", "faults.health_interval_s=0.5"])
    gens, workers = factory.generators(), factory.reward_workers()
    ray.get([a.ready.remote() for a in gens + workers])
    victim = gens[0]
    sup = Supervisor(cfg.faults, cfg.cluster.start_timeout_s, factory, gens, None, 0, lambda m: None)
    try:
        pipe = side(cfg, gens, workers, tok, sup)
        rows = [{"prompt": f"{i}*{i + 1}=", "answer": str(i * (i + 1))} for i in range(24)]
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(groups=pipe.sample(
            rows, [sample_seeds(0, "eval", i, 2) for i in range(24)], {"top_p": 1.0}, timeout_s=300)))
        t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(e.turns for e in list(pipe.episodes.episodes.values())):
            time.sleep(0.01)
        ray.kill(victim)  # some episodes are mid-way: a turn sampled, the next one coming
        t.join(timeout=320)
        groups = out["groups"]
        assert [len(g.samples) for g in groups] == [2] * 24
        assert pipe.episodes.counts["requeued_turns"] >= 1 and sup.generators[0] is not victim
        for g in groups:
            assert g.episode["turns"] == [2, 2] and g.episode["outcome"] == ["done", "done"]
            for s in g.samples:  # the observation between two model turns, whichever engine sampled them
                mask = s.loss_mask
                assert mask is not None and mask.count(0) == len(OBS_IDS(tok)) and mask[0] == 1 == mask[-1]
        pipe.close()
    finally:
        sup.close()
