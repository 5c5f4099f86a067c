"""The benchmarks' arithmetic (step breakdown, targets, the summary rebuilt from
reports on disk, the pipeline figures) and `grpo bench`'s fast refusal of a bad
override. The short real runs through `grpo bench` are in tests/e2e/test_benchmarks.py."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.cli import targets
from benchmarks.step import breakdown


def _row(step, started, **kw):
    base = {"step": step, "time/started": started, "time/wait_batch": 1.1, "time/train": 0.5,
            "time/sync": 0.1, "time/generate_engine": 0.9, "train/seconds": 0.4, "samples": 256, "tokens": 2560}
    return {**base, **kw}


def test_step_breakdown_splits_the_period():
    rows = [_row(1, 0.0, **{"time/wait_batch": 5.0}), _row(2, 5.0), _row(3, 6.8), _row(4, 8.8)]
    steps = breakdown(rows, warmup=1)  # step 1 is warm-up; step 4 has no next start
    assert [s["step"] for s in steps] == [2, 3]
    first = steps[0]
    assert first["period_s"] == pytest.approx(1.8)
    assert first["idle_s"] == pytest.approx(1.8 - (1.1 + 0.5 + 0.1))
    assert first["overhead_s"] == pytest.approx(1.8 - 0.9 - 0.4)
    assert steps[1]["idle_s"] == pytest.approx(2.0 - 1.7)


def test_step_breakdown_overhead_when_generation_and_training_overlap():
    # S >= 1: the generator works while the learner trains; what bounds a step is the
    # larger of the two, so the overhead is the period less that
    rows = [_row(1, 0.0), _row(2, 1.0, **{"time/generate_engine": 1.5}), _row(3, 2.6), _row(4, 3.6)]
    serial, overlapped = breakdown(rows, 1), breakdown(rows, 1, overlapped=True)
    assert serial[0]["overhead_s"] == pytest.approx(1.6 - 1.5 - 0.4)  # counted as taking turns: both subtracted
    assert overlapped[0]["overhead_s"] == pytest.approx(1.6 - 1.5)
    assert overlapped[1]["overhead_s"] == pytest.approx(1.0 - 0.9)


def test_step_figures_take_a_batch_as_the_mean_over_alternating_steps():
    from benchmarks.step import figures

    # S = 1: engine time per step alternates 0.7 / 1.3 s; over the three measured steps the
    # median lands on 0.7, the batch's generation is their mean, 0.9
    rows = [_row(1, 0.0, response_length=10.0)]
    for k, (start, eng) in enumerate([(2.0, 0.7), (3.0, 1.3), (4.5, 0.7), (5.5, 1.3)]):
        rows.append(_row(k + 2, start, response_length=10.0, **{"time/generate_engine": eng, "train/seconds": 0.8}))
    outside = {"raw_vllm_s": 0.8, "hf_generate_s": 0.5, "batch_tokens": 1000.0, "raw_torch_step_s": 1.0}
    f = figures(rows, 1, 256, True, outside)
    assert [s["step"] for s in f["steps"]] == [2, 3, 4]
    assert f["median"]["generate_compute_s"] == pytest.approx(0.7) and f["median"]["period_s"] == pytest.approx(1.0)
    assert f["mean"]["generate_compute_s"] == pytest.approx(0.9) and f["mean"]["train_compute_s"] == pytest.approx(0.8)
    assert f["generate_per_batch_s"] == pytest.approx(0.9) and f["in_job_vs_raw_vllm"] == pytest.approx(0.9 / 0.8)
    assert f["mean_period_s"] == pytest.approx(3.5 / 3) and f["samples_per_s_mean"] == pytest.approx(256 / (3.5 / 3))
    assert f["overhead_share"] == pytest.approx(1 - 0.9 / (3.5 / 3))  # against the larger side: generation
    serial = figures(rows, 1, 256, False, outside)
    assert serial["overhead_share"] == pytest.approx(1 - 1.7 / (3.5 / 3))  # S = 0 would have to add them
    assert f["learner_vs_raw_torch"] == pytest.approx(0.8)


def test_peer_figures_median_and_mean_and_pairs():
    from benchmarks.peer import combine, figures

    # ours alternates between two modes (S >= 1): the median of the measured steps lands on
    # the fast one, the mean is the throughput
    mine = [9.0, 0.8, 1.6, 0.8, 1.6, 0.8]
    theirs = [5.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    f = figures(mine, theirs, warmup=1, batch=256)
    assert f["ours_median_s"] == pytest.approx(0.8) and f["ours_mean_s"] == pytest.approx(5.6 / 5)
    assert f["speedup_vs_trl"] == pytest.approx(1.25) and f["speedup_vs_trl_mean"] == pytest.approx(1.0 / 1.12)
    assert f["ours_samples_per_s_mean"] == pytest.approx(256 / 1.12)
    # three pairs on a drifting machine: the ratio is the median of each pair's own ratio
    # (1.25, 2.5, 0.3125 -> 1.25); the seconds are each figure's own median over the pairs
    pairs = [figures(mine, theirs, 1, 256), figures([m / 2 for m in mine], theirs, 1, 256),
             figures([m * 4 for m in mine], theirs, 1, 256)]
    both = combine(pairs)
    assert both["speedup_vs_trl"] == pytest.approx(1.25) and both["ours_median_s"] == pytest.approx(0.8)
    assert both["speedup_vs_trl_mean"] == pytest.approx(1.0 / 1.12)
    pairs[0] = figures(mine, [t * 3 for t in theirs], 1, 256)  # 3.75x: now the middle pair is the fast one
    assert combine(pairs)["speedup_vs_trl"] == pytest.approx(2.5)
    assert combine(pairs)["ours_median_s"] == pytest.approx(0.8)  # seconds: their own median


def test_targets_say_met_or_missed():
    results = {
        "generation": {"results": [{"model": "50M", "ratio_actor_to_raw": 0.97}, {"model": "0.5M", "ratio_actor_to_raw": 0.9}]},
        "weight_sync": {"results": [{"model": "1M", "bytes": 2**22, "generators": 2, "ratio_sync_to_raw": 3.2,
                                     "ratio_sync_to_raw_plus_load": 1.1}]},
        "step": {"results": {"overhead_share": 0.04, "median": {"period_s": 2.5}, "samples_per_s": 102.0}},
        "pipeline": {"results": {"speedup": 1.5, "cap": 1.6, "speedup_of_cap": 1.5 / 1.6, "best": "S=2",
                                 "samples_per_s_async": 150.0, "samples_per_s_sync": 100.0}},
    }
    rows = {r[0].split(",")[-1].strip()[:12]: (r[1], r[3]) for r in targets(results)}
    assert rows["50M model"] == ("0.970", "yes") and rows["0.5M model"] == ("0.900", "no")
    (sync,) = [r for r in targets(results) if r[0].startswith("weight sync")]
    assert sync[1:] == ["3.20", "<= 1.5", "no"] and "[/ (raw + vLLM load): 1.10]" in sync[0]
    (step,) = [r for r in targets(results) if r[0].startswith("orchestration")]
    assert step[1:] == ["4.0%", "<= 10%", "yes"]
    (pipe,) = [r for r in targets(results) if r[0].startswith("async / sync")]
    assert pipe[1:] == ["1.50", ">= 1.6 or >= 85% of cap", "yes"] and "94% of its cap 1.60x" in pipe[0]
    results["pipeline"]["results"].update(speedup=1.2, speedup_of_cap=1.2 / 1.6)
    (pipe,) = [r for r in targets(results) if r[0].startswith("async / sync")]
    assert pipe[3] == "no"


def test_target_rows_read_old_and_new_reports():
    step_old = {"overhead_share": 0.04, "median": {"period_s": 2.5, "generate_compute_s": 1.2}, "samples_per_s": 102.0,
                "in_job_vs_raw_vllm": 1.5, "raw_vllm_s": 0.8, "hf_generate_s": 0.5}
    step_new = {**step_old, "mean_period_s": 2.0, "samples_per_s_mean": 128.0, "generate_per_batch_s": 0.9,
                "in_job_vs_raw_vllm": 0.9 / 0.8}
    peer_old = {"speedup_vs_trl": 0.8, "ours_median_s": 1.25, "trl_median_s": 1.0}
    peer_new = {**peer_old, "speedup_vs_trl_mean": 0.7, "ours_mean_s": 1.43, "trl_mean_s": 1.0}
    for step, peer, label, gen in ((step_old, peer_old, "(2.50 s, 102 samples/s)", "(1.20 vs"),
                                   (step_new, peer_new, "(2.00 s, 128 samples/s)", "(0.90 vs")):
        rows = targets({"step": {"results": step}, "peer": {"results": peer}})
        (over,) = [r for r in rows if r[0].startswith("orchestration")]
        (inj,) = [r for r in rows if r[0].startswith("in-job")]
        (vs,) = [r for r in rows if r[0].startswith("samples/s vs TRL")]
        assert label in over[0] and gen in inj[0] and vs[1:] == ["0.80", ">= 1.0", "no"]
        assert ("by mean step times 1.43 vs 1.00 s: 0.70x" in vs[0]) == (peer is peer_new)
    assert inj[1:] == ["1.12", "<= 1.15", "yes"]


def test_summary_is_rebuilt_from_the_reports_on_disk(tmp_path):
    from benchmarks.cli import summarize

    step = {"benchmark": "step", "seconds": 50.0, "summary": {"step/overhead_share": 0.12},
            "machine": {"cpu": "X", "cores": 2, "memory_gib": 8.0, "gpu": None}, "versions": {"torch": "2"},
            "results": {"overhead_share": 0.12, "median": {"period_s": 3.0}, "samples_per_s": 85.3}}
    (tmp_path / "step.json").write_text(json.dumps(step))
    assert summarize(tmp_path) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "| orchestration overhead share of a step (3.00 s, 85 samples/s) | 12.0% | <= 10% | no |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["summaries"] == {"step": {"step/overhead_share": 0.12}}
    assert summarize(tmp_path / "empty") == 1


def test_bad_override_is_named_before_anything_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "weight-sync", "--out", str(tmp_path),
                           "sync.bucket_mb=-1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "grpo bench weight-sync: invalid config" in proc.stderr and "sync.bucket_mb" in proc.stderr
    assert not list(tmp_path.iterdir())  # no model built, no report written


def test_pipeline_bench_figures_come_from_the_steps_after_warmup():
    from benchmarks.pipeline import measure

    def row(step, started, wait, stale):
        return {"step": step, "time/started": started, "time/wait_batch": wait, "time/train": 1.0, "time/sync": 0.1,
                "time/generate_engine": 1.5, "train/seconds": 0.9, "time/sync_pause": 0.05,
                "staleness/mean": stale, "staleness/max": int(stale), "accuracy": 0.5}

    rows = [row(1, 0.0, 9.0, 0), row(2, 9.0, 2.0, 0), row(3, 11.0, 0.5, 1), row(4, 13.0, 0.5, 1), row(5, 14.6, 0.5, 1)]
    m = measure(rows, warmup=2, samples=256)  # steps 3-5: periods 2.0 and 1.6
    assert m["period_s"] == pytest.approx(1.8) and m["samples_per_s"] == pytest.approx(256 / 1.8)
    assert m["steps_measured"] == 2 and m["staleness_max"] == 1 and m["wait_batch_s"] == 0.5
    assert m["generator_busy_share"] == pytest.approx(1.5 / 1.8)


def test_the_raw_torch_step_trains_on_completion_tokens_only(tiny_model):
    """The learner's limit in `grpo bench step`: a bare forward/backward/AdamW step. Its loss
    reaches only completion tokens: a step on a batch whose completions are one token each
    changes the weights, and one with prompts only (no completion token) does not."""
    import torch

    from benchmarks.step import RawTorchStep

    raw = RawTorchStep(str(tiny_model), micro=2, lr=1e-2)
    before = {k: v.clone() for k, v in raw.model.state_dict().items()}
    out = raw.step([[5, 6, 7], [5, 6, 7, 8], [9, 10]], [3, 3, 1])  # completions: none, one token, one token
    assert out["tokens"] == 9 and out["seconds"] > 0
    assert any(not torch.equal(before[k], v) for k, v in raw.model.state_dict().items())
    raw = RawTorchStep(str(tiny_model), micro=2, lr=1e-2)
    before = {k: v.clone() for k, v in raw.model.state_dict().items()}
    raw.step([[5, 6, 7], [9, 10]], [3, 2])
    assert all(torch.equal(before[k], v) for k, v in raw.model.state_dict().items())
