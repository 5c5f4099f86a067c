"""A run's files: nothing lost, nothing torn taken for whole, nothing of another run
written over or restored (issue 19, items 1, 2, 5, 13, 14). No Ray here: the pieces
that decide, on files the tests write themselves."""
import json
import os

import msgpack
import pytest

from cluster.artifacts import checkpoint
from cluster.artifacts.files import (RunDirError, check_output, holds_run, new_run_id, replace_dir, temp_dir_for,
                                     write_atomic)
from cluster.artifacts.metrics import MetricsLog
from cluster.artifacts.record import FORMAT, Recorder, read_step, select, steps
from cluster.commands.samples import printable, show_sample

from cluster.artifacts.files import make_run_dir, run_dir_for
from cluster.config import load_config
from cluster.data import DatasetError, load_jsonl, load_pairs


def test_a_reused_run_name_is_refused_naming_resume_and_nothing_is_touched(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=mine"])
    run = make_run_dir(run_dir_for(cfg), cfg)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "rollouts").mkdir()
    (run / "rollouts" / "step-000001.msgpack").write_bytes(b"x")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match=r"--resume .*mine.*fresh run.name"):
        run_dir_for(cfg)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_unnamed_run_never_lands_in_an_existing_directory(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    first = make_run_dir(run_dir_for(cfg), cfg)
    said = []
    second = run_dir_for(cfg, said.append)
    if second.name.startswith(first.name):  # same second: a fresh name, and it is said
        assert second != first and said and str(second) in said[0]
    assert not second.exists()


def test_a_checkpoint_of_another_run_is_refused_and_a_torn_state_is_named_and_skipped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    new_run_id(run)
    for step in (2, 4):
        d = run / "checkpoints" / f"step-{step}"
        d.mkdir(parents=True)
        write_atomic(d / checkpoint.STATE_FILE, json.dumps({"step": step, "cursor": step * 4, "policy_version": step,
                                                            "run_id": json.loads((run / "run.json").read_text())["id"]}))
    (run / "checkpoints" / "step-4" / checkpoint.STATE_FILE).write_text('{"step": 4, "cur')  # torn
    said = []
    path, state = checkpoint.latest(run, said.append)
    assert path.name == "step-2" and state["cursor"] == 8
    assert said and "step-4" in said[0] and checkpoint.STATE_FILE in said[0]
    new_run_id(run)  # the directory now belongs to another run: its checkpoints are not this run's
    with pytest.raises(RunDirError, match="another run"):
        checkpoint.latest(run, said.append)


def test_a_torn_metrics_line_is_dropped_and_said_a_bad_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    said = []
    log = MetricsLog(path, keep_steps=2, log=said.append)
    assert [r["step"] for r in log.rows] == [1, 2] and "torn last line 3" in said[0]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2"):
        MetricsLog(path, keep_steps=3)


def test_fault_counters_of_redone_steps_survive(tmp_path):
    """A learner restart from step 1 drops rows 2-3; the faults they counted move to the
    next row written, so metrics.jsonl sums to what happened."""
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "faults/generator_restarts": 0.0})
    log.append({"step": 2, "faults/generator_restarts": 1.0, "faults/reward_worker_restarts": 0.0})
    log.append({"step": 3, "faults/generator_restarts": 0.0, "faults/reward_worker_restarts": 1.0})
    log.truncate(1)
    log.append({"step": 2, "faults/generator_restarts": 0.0, "faults/learner_restarts": 1.0})
    log.append({"step": 3, "faults/generator_restarts": 0.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    total = {k: sum(r.get(k, 0.0) for r in rows) for k in ("faults/generator_restarts",
                                                          "faults/reward_worker_restarts", "faults/learner_restarts")}
    assert total == {"faults/generator_restarts": 1.0, "faults/reward_worker_restarts": 1.0,
                     "faults/learner_restarts": 1.0}
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "run_state.json"
    write_atomic(path, "old")
    write_atomic(path, "new")
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["run_state.json"]
    final = tmp_path / "final"
    tmp = temp_dir_for(final)
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    assert not final.exists()  # a model directory appears only once it is complete
    replace_dir(tmp, final)
    assert (final / "config.json").is_file() and not tmp.exists()


def test_sft_output_never_overwrites_its_model_or_an_earlier_result(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="is the model"):
        check_output(model, str(model))
    with pytest.raises(RunDirError, match="not empty"):
        check_output(model)
    check_output(tmp_path / "fresh", str(model))
    assert holds_run(tmp_path) is False


def _record(run, step, groups):
    Recorder(run, 16).write(step, step, groups)


def test_records_that_are_truncated_empty_or_stray_are_named_or_ignored(tmp_path):
    sample = {"text": "\x1b]0;pwned\x07<answer>2</answer>\x1b[2J", "token_ids": [1], "logprobs": [-0.1],
              "finish_reason": "stop", "versions": [[0, 0]], "seed": 1, "reward": 1.0, "advantage": 0.5,
              "scores": {"accuracy": 1.0}, "info": {"accuracy": {"error": "bad\x1b[31m"}}}
    group = {"key": 0, "prompt": "1+1=\x1b[H", "prompt_ids": [1], "row": {}, "trained": True, "dropped": None,
             "samples": [sample]}
    _record(tmp_path, 1, [group])
    rollouts = tmp_path / "rollouts"
    (rollouts / "step-abc.msgpack").write_bytes(b"\x00")  # stray: not a record
    (rollouts / "step-000002.msgpack").write_bytes(msgpack.packb({"format": FORMAT})[:-3])  # truncated
    (rollouts / "step-000003.msgpack").write_bytes(b"")  # empty
    assert steps(tmp_path) == [1, 2, 3]
    for step in (2, 3):
        with pytest.raises(ValueError, match=f"step-00000{step}.msgpack"):
            read_step(rollouts / f"step-00000{step}.msgpack")
    [item] = list(select(tmp_path, 1, "best", 1, None))
    shown = show_sample(item)
    assert "\x1b" not in shown and "\x07" not in shown and "\\x1b]0;pwned" in shown and "<answer>2</answer>" in shown
    with pytest.raises(ValueError, match="at least 1"):
        list(select(tmp_path, 1, "best", -3, None))


def test_printable_escapes_control_characters_but_keeps_lines():
    assert printable("a\tb\nc\x1b[2Jd\u202e") == "a\tb\nc\\x1b[2Jd\\u202e"


def test_datasets_name_the_file_and_line(tmp_path):
    with pytest.raises(DatasetError, match="is not a file"):
        load_pairs(tmp_path)  # a directory
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "answer": 1}\n{"prompt": "\xff", "answer": 2}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: not UTF-8"):
        load_jsonl(bad)


def test_a_record_keeps_which_tokens_the_model_sampled(tmp_path):
    """An episode's loss mask survives the record and comes back to the learner (replay)."""
    from cluster.artifacts.record import batch_records, to_groups
    from rollout.types import Group, Sample

    episode = Sample([8, 9, 10], [-0.1, 0.0, -0.3], "x", "stop", [(0, 0)], 7, loss_mask=[1, 0, 1])
    plain = Sample([8], [-0.2], "y", "stop", [(0, 0)], 8)
    g = Group([5], "p", {"answer": "1"}, [episode, plain], rewards=[1.0, 0.0], reward_parts={"math": [1.0, 0.0]},
              key=0)
    run = tmp_path / "run"
    Recorder(run, 16).write(1, 1, batch_records([g], [g], {}, "grpo", 1e-6))
    [back] = to_groups(read_step(run / "rollouts" / "step-000001.msgpack"))
    assert back.samples[0].loss_mask == [1, 0, 1] and back.samples[1].loss_mask is None
    assert [s.completion_ids for s in back.samples] == [[8, 9, 10], [8]]
