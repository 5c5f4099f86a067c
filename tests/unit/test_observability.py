"""The rollout record's size bound (the record of a real run, the console, TensorBoard,
`grpo samples` and `grpo replay` are in tests/e2e/test_observability.py)."""


def test_the_record_stays_under_its_size_bound(tmp_path):
    from cluster.artifacts.record import Recorder, read_step, steps

    rec = Recorder(tmp_path, max_mb=0.05)  # 52 kB
    group = {"key": 0, "prompt": "1+1=", "prompt_ids": [1, 2], "row": {"answer": "2"}, "trained": True,
             "dropped": None, "samples": [{"text": "x" * 2000, "token_ids": list(range(500)),
                                           "logprobs": [-0.5] * 500}]}
    for step in range(1, 21):
        rec.write(step, step - 1, [group])
        total = sum(p.stat().st_size for p in (tmp_path / "rollouts").iterdir())
        assert total <= 0.05 * 2**20
    kept = steps(tmp_path)
    assert kept[-1] == 20 and 1 < len(kept) < 20 and kept == list(range(kept[0], 21))  # the newest, contiguous
    assert read_step(tmp_path / "rollouts" / "step-000020.msgpack")["groups"] == [group]
