"""Learner -> vLLM weight updates through the real stack: Ray actors, vLLM engines
(CPU), a DeepSpeed learner, the gloo transfer group; and the behaviour logprobs the
generators record."""
import time

import numpy as np
import pytest
import ray

from cluster.actors.factory import ActorFactory
from rollout.seeds import sample_seeds
from tests.helpers import SEQ, hf_logprobs, placed, synthetic_groups


@pytest.fixture(scope="module")
def stack(tiny_model):
    cfg = placed(["rollout.num_generators=2", "rollout.partial=recompute", "rollout.n=4", "rollout.max_tokens=6",
                  "rollout.temperature=0.7", "learner.lr=0.01", "sync.bucket_mb=0.5", "run.prompts_per_step=2"])
    factory = ActorFactory.for_job(cfg, str(tiny_model))
    gens, learners = factory.generators(), factory.learner_group()
    ray.get([a.ready.remote() for a in gens + learners.ranks])
    learners.connect(gens)
    yield cfg, gens, learners
    ray.shutdown()


def generate(gen, rows, first_key=0, n=4):
    groups = ray.get(gen.generate.remote(rows, [sample_seeds(0, "train", first_key + i, n) for i in range(len(rows))]))
    for i, g in enumerate(groups):
        g.key = first_key + i
    return groups


def test_sampler_logprobs_are_the_behaviour_policy_at_the_sampling_temperature(stack, tiny_model):
    cfg, gens, learners = stack
    state = ray.get(learners.ranks[0].state_dict_numpy.remote())
    [g] = generate(gens[0], [{"prompt": "12+7=", "answer": "19"}])
    for s in g.samples:
        ids = g.prompt_ids + s.completion_ids
        at_t = hf_logprobs(tiny_model, state, ids, temperature=0.7)[len(g.prompt_ids) - 1:]
        raw = hf_logprobs(tiny_model, state, ids, temperature=1.0)[len(g.prompt_ids) - 1:]
        # the recorded logprob is the one the token was drawn with: temperature applied
        assert np.abs(np.array(s.logprobs) - at_t).max() < 1e-4
        assert np.abs(np.array(s.logprobs) - raw).max() > 1e-2


def test_the_same_seed_draws_the_same_sample_on_any_generator(stack):
    cfg, gens, learners = stack
    rows = [{"prompt": "3+4=", "answer": "7"}]
    a, b = generate(gens[0], rows, first_key=5)[0], generate(gens[1], rows, first_key=5)[0]
    assert [s.completion_ids for s in a.samples] == [s.completion_ids for s in b.samples]
    c = generate(gens[0], rows, first_key=6)[0]  # another prompt draw: another stream
    assert [s.completion_ids for s in a.samples] != [s.completion_ids for s in c.samples]
    assert len({s.seed for s in a.samples + c.samples}) == 8


def test_a_turn_from_token_ids_ends_at_a_stop_string_kept_in_its_ids(stack):
    """One turn of an episode: sampled from exact token ids, ended by a stop string that
    stays in the output; the same seed draws the same tokens as without the stop, up to it."""
    cfg, gens, learners = stack
    ids = [40, 41, 42, 43, 44, 45]
    stops = list("0123456789aeo ,")  # common characters: a random model's turn ends soon
    [free] = ray.get(gens[0].generate.remote([{"prompt": ids}], [[1, 2, 3, 4]], {"max_tokens": 40}))
    [turn] = ray.get(gens[0].generate.remote([{"prompt": ids}], [[1, 2, 3, 4]], {"max_tokens": 40, "stop": stops}))
    assert turn.prompt_ids == ids
    stopped = 0
    for a, b in zip(free.samples, turn.samples):
        assert a.completion_ids[: len(b.completion_ids)] == b.completion_ids  # same draws, cut at the stop
        assert b.logprobs == a.logprobs[: len(b.logprobs)] and len(b.logprobs) == len(b.completion_ids)
        ends = [x for x in stops if b.text.endswith(x)]
        if b.finish_reason == "stop" and ends:
            stopped += 1
            earliest = min(a.text.find(x) + len(x) for x in stops if x in a.text)
            assert len(b.text) == earliest  # the first stop string ends the turn, and is kept
    assert stopped >= 3, [s.text for s in turn.samples]
    with pytest.raises(Exception, match="non-empty string"):
        ray.get(gens[0].generate.remote([{"prompt": ids}], [[1]], {"stop": [""]}))


def test_update_reaches_every_engine_and_matches_transformers(stack, tiny_model):
    cfg, gens, learners = stack
    before_state = ray.get(learners.ranks[0].state_dict_numpy.remote())
    old = [np.array(x) for x in ray.get([g.prompt_logprobs.remote(SEQ) for g in gens])]
    np.testing.assert_allclose(old[0], hf_logprobs(tiny_model, before_state, SEQ), atol=1e-4)

    rows = [{"prompt": "12+7=", "answer": "19"}, {"prompt": "3+4=", "answer": "7"}]
    groups = generate(gens[0], rows[:1], 0) + generate(gens[1], rows[1:], 1)
    assert all(s.version == 0 for g in groups for s in g.samples)
    for g in groups:
        assert len(g.samples) == 4
        g.rewards = [1.0, 0.0, 0.0, 1.0]
        for s in g.samples:
            assert len(s.logprobs) == len(s.completion_ids) > 0 and all(lp <= 0 for lp in s.logprobs)
    metrics = learners.train(groups)
    assert metrics["train/grad_norm"] > 0 and metrics["train/skipped_updates"] == 0
    # the learner scores each token at the sampling temperature, as the sampler drew it
    assert metrics["train/sampler_logprob_diff"] < 1e-4

    after_state = ray.get(learners.ranks[0].state_dict_numpy.remote())
    changed = [k for k in after_state if not np.array_equal(after_state[k], before_state[k])]
    assert len(changed) == len(after_state)

    sync = learners.push(1)
    assert sync["sync/bytes"] == sum(v.nbytes for k, v in after_state.items() if k != "lm_head.weight")
    expected = hf_logprobs(tiny_model, after_state, SEQ)
    for g in gens:
        new = np.array(ray.get(g.prompt_logprobs.remote(SEQ)))
        assert np.abs(new - expected).max() <= 1e-4
        assert np.abs(new - old[0]).max() > 1e-3  # and it really is different from before

    groups = generate(gens[1], rows, 10)
    assert {s.version for g in groups for s in g.samples} == {1}
    assert ray.get([g.ready.remote() for g in gens])[0]["version"] == 1

    # A second update lands through the buffers the first one left behind (the
    # generators' receive arena, the learner's pack buffers): no stale bytes.
    for g in groups:
        g.rewards = [1.0, 0.0, 0.0, 1.0]
    learners.train(groups)
    second_state = ray.get(learners.ranks[0].state_dict_numpy.remote())
    learners.push(2)
    second_expected = hf_logprobs(tiny_model, second_state, SEQ)
    assert np.abs(second_expected - expected).max() > 1e-3
    for g in gens:
        assert np.abs(np.array(ray.get(g.prompt_logprobs.remote(SEQ))) - second_expected).max() <= 1e-4
    timings = ray.get(gens[0].take_timings.remote())  # both syncs, as the generator saw them
    # on CPU the transfer happens while the engine may sample; only the load pauses it
    assert 0 < timings["sync/wait"] <= timings["sync/receive"]
    assert 0 < timings["sync/load"] <= timings["sync/pause"] <= timings["sync/finish"]
    assert timings["generate/engine"] > timings["generate/convert"] > 0


def test_a_partial_rollout_update_lands_mid_sequence(stack):
    cfg, gens, learners = stack
    version = ray.get(gens[0].ready.remote())["version"]
    jobs = [(100 + i, {"prompt": "1+1="}, sample_seeds(0, "partial", i, 4)) for i in range(4)]
    steps = ray.get(gens[0].health.remote())["steps"]
    ray.get(gens[0].submit.remote(jobs, {"max_tokens": 200}))  # random weights: long completions
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the engine is sampling these (a fixed sleep raced a busy machine)
        h = ray.get(gens[0].health.remote())
        if h["steps"] >= steps + 2 and h["load"] > 0:
            break
        time.sleep(0.005)
    learners.push(version + 1)  # lands between two engine steps while the samples are in flight
    groups = []
    while len(groups) < 4:
        groups += ray.get(gens[0].collect.remote(10.0))
    samples = [s for g in groups for s in g.samples]
    straddling = [s for s in samples if len(s.versions) == 2]
    assert straddling, [s.versions for s in samples]
    for s in straddling:  # tokens [0, k) from the old weights, [k, end) from the new
        (old, first), (new, k) = s.versions
        assert (old, first, new) == (version, 0, version + 1) and 0 < k < len(s.completion_ids)
        assert s.version == version  # the oldest counts for staleness
        assert len(s.logprobs) == len(s.completion_ids)
    timings = ray.get(gens[0].take_timings.remote())
    assert 0 < timings["sync/pause"] < timings["sync/receive"] + timings["sync/finish"]


def test_partial_keep_goes_on_over_the_old_kv_and_new_requests_never_reuse_it(stack, tiny_model):
    """rollout.partial=keep against recompute (gens[0]), one update landing mid-sequence on
    both: before it, tokens are the old weights'; after it, recompute's are exactly the new
    weights' over the whole sequence, keep's are drawn over the old KV of the prefix. A new
    request on the keep engine, with a prompt whose first KV block the old weights cached,
    is scored wholly by the new weights (the cache is salted with the version)."""
    cfg, gens, learners = stack
    version = ray.get(gens[0].ready.remote())["version"]
    ray.kill(gens[1], no_restart=True)
    factory = ActorFactory.for_job(cfg, str(tiny_model))
    factory.rollout = factory.rollout.model_copy(update={"partial": "keep"})
    gens[1] = factory.generator(1, version)
    ray.get(gens[1].ready.remote())
    learners.connect(gens)
    learners.push(version)  # the new engine gets the learner's weights
    old_state = ray.get(learners.ranks[0].state_dict_numpy.remote())
    learners.train(synthetic_groups(num_groups=2, seed=11))
    new_state = ray.get(learners.ranks[0].state_dict_numpy.remote())

    prompt = [40 + i % 50 for i in range(130)]  # longer than one KV block (128 tokens on CPU)
    ray.get([g.generate.remote([{"prompt": prompt}], [[1]], {"max_tokens": 4}) for g in gens])  # both warm
    jobs = [(200 + i, {"prompt": prompt}, sample_seeds(0, "keep", i, 4)) for i in range(8)]
    steps = [h["steps"] for h in ray.get([g.health.remote() for g in gens])]
    ray.get([g.submit.remote(jobs, {"max_tokens": 120}) for g in gens])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hs = ray.get([g.health.remote() for g in gens])
        if all(h["steps"] >= s + 2 and h["load"] > 0 for h, s in zip(hs, steps)):
            break
        time.sleep(0.005)
    else:
        raise AssertionError(f"the samples were never in flight on both engines at once: {hs}")
    learners.push(version + 1)
    [fresh] = ray.get(gens[1].generate.remote([{"prompt": prompt}], [[7, 8]], {"max_tokens": 8}))

    def straddling(gen):
        groups = []
        while len(groups) < len(jobs):
            groups += ray.get(gen.collect.remote(10.0))
        out = [s for g in groups for s in g.samples if len(s.versions) == 2]
        assert out, [(s.versions, len(s.completion_ids), s.finish_reason) for g in groups for s in g.samples]
        return out

    def scored(state, sample):
        return hf_logprobs(tiny_model, state, prompt + sample.completion_ids, temperature=0.7)[len(prompt) - 1:]

    for mode, gen in (("keep", gens[1]), ("recompute", gens[0])):
        for s in straddling(gen):
            (_, _), (new, k) = s.versions
            assert new == version + 1 and 0 < k < len(s.completion_ids)
            lp = np.array(s.logprobs)
            assert np.abs(lp[:k] - scored(old_state, s)[:k]).max() < 1e-4, mode
            after = np.abs(lp[k:] - scored(new_state, s)[k:]).max()
            if mode == "recompute":
                assert after < 1e-4  # re-prefilled: the new weights over the whole sequence
            else:
                assert after > 1e-3  # the old KV of the prefix: not what recompute gives
    for s in fresh.samples:  # never the old weights' cached block of the prompt
        assert s.versions == [(version + 1, 0)]
        assert np.abs(np.array(s.logprobs) - scored(new_state, s)).max() < 1e-4
