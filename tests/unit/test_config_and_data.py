"""Config loading, overrides and errors; datasets; the CLI's cheap paths."""
import subprocess
import sys
import time

import pytest

from cluster.config import ConfigError, load_config
from cluster.data import DatasetError, PromptStream, arithmetic_rows, arithmetic_split, load_jsonl, reference_completion
from cluster.config import DataConfig
from rewards.verifiers import accuracy_reward, extract_answer, format_reward


def test_overrides_and_yaml_compose(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learner:\n  lr: 0.01\nrollout:\n  n: 4\n")
    cfg = load_config(f, ["rollout.n=6", "rewards.verifiers={accuracy: 1.0}"])
    assert cfg.learner.lr == 0.01
    assert cfg.rollout.n == 6
    assert cfg.rewards.verifiers == {"accuracy": 1.0}
    assert cfg.run.steps == 80  # untouched default


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("learner.lrr=1", "learner.lrr: unknown key"),
        ("nosuch.key=1", "nosuch: unknown key"),
        ("learner.lr=abc", "learner.lr: Input should be a valid number"),
        ("rollout.n=0", "rollout.n: Input should be greater than or equal to 1"),
        ("rewards.verifiers={nope: 1}", "verifiers.nope: unknown verifier"),
        ("sync.backend=nccl", "sync.backend=nccl needs GPUs"),
        ("learner.zero_stage=4", "learner.zero_stage"),
        ("learner.advantage=nope", "learner.advantage: unknown name 'nope'; choices: ['dr_grpo', 'grpo', 'reinforce_pp', 'rloo']"),
        ("learner.policy_loss=typo", "learner.policy_loss: unknown name 'typo'; choices: ['gspo', 'pg', 'ppo_clip']"),
        ("learner.reduction=mean", "learner.reduction: unknown name 'mean'; choices: ['seq_mean_token_mean'"),
        ("learner.kl_estimator=k4", "learner.kl_estimator: unknown name 'k4'; choices: ['k1', 'k2', 'k3']"),
        ("learner.is_correction=is", "learner.is_correction: unknown name 'is'; choices: ['mask', 'none', 'tis']"),
        ("sync.backend=mpi", "sync.backend: Input should be 'gloo' or 'nccl'"),
        ("rollout.temperature=0", "rollout.temperature: Input should be greater than 0"),
        ("rollout.top_p=0.95", "rollout.top_p: top_p < 1 is refused for training rollouts"),
        ("learner.policy_loss=gspo", "learner.policy_loss=gspo needs learner.reduction=seq_mean_token_mean"),
        ("learner.is_threshold_low=3", "learner.is_threshold_low=3.0 must be below learner.is_threshold_high=2.0"),
        ("learner.lora.target_modules=[q_proj,qkv]", "learner.lora.target_modules: unknown or no target modules ['qkv']"),
        ("learner.lora.target_modules=[]", "learner.lora.target_modules: unknown or no target modules []"),
        ("learner.lora.rank=-1", "learner.lora.rank: Input should be greater than or equal to 0"),
        ("rollout.partial=sometimes", "rollout.partial: Input should be 'recompute', 'keep' or 'off'"),
    ],
)
def test_bad_config_names_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


@pytest.mark.parametrize("value, mode", [("true", "recompute"), ("false", "off"), ("keep", "keep"), ("off", "off")])
def test_partial_reads_the_old_booleans_as_modes(value, mode):
    """Configs written when rollout.partial was a boolean still load, as the same behaviour."""
    assert load_config(None, [f"rollout.partial={value}"]).rollout.partial == mode


def test_a_lora_run_refuses_another_kl_reference():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.lora.rank=8", "learner.kl_coef=0.1", "learner.reference_path=/some/model"])
    assert "learner.reference_path is set with learner.lora.rank > 0" in str(err.value)
    assert load_config(None, ["learner.lora.rank=8", "learner.kl_coef=0.1"]).learner.lora.rank == 8


def test_cli_rejects_bad_config_before_starting_anything(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", "learner.lrr=1", f"run.output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "learner.lrr: unknown key" in proc.stderr
    assert not any(tmp_path.iterdir())  # no run directory, no model, no actors
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("override, key", [("learner.advantage=nope", "learner.advantage"),
                                           ("learner.policy_loss=typo", "learner.policy_loss"),
                                           ("rollout.temperature=0", "rollout.temperature"),
                                           ("rewards.verifiers={nope: 1}", "verifiers.nope")])
def test_cli_rejects_bad_names_fast_without_starting_ray(tmp_path, override, key):
    code = ("import sys\nfrom cluster.cli import main\n"
            f"rc = main(['train', {override!r}, 'run.output_dir={tmp_path}'])\n"
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'imported ray/torch'\n"
            "sys.exit(rc)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - t0 < 5.0
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and "invalid config" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_cli_rejects_bad_dataset_row_with_its_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2="}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", f"data.path={data}", f"run.output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert f"{data}:3: missing required field 'answer'" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["bench", "--help"], ["bench", "weight-sync", "--help"],
                                  ["bench", "generation", "--help"], ["bench", "step", "--help"], ["bench", "rewards", "--help"]])
def test_help_is_fast_and_imports_nothing_heavy(args):
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from cluster.cli import main\n"
        "try:\n    main(%r)\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'ray', 'vllm', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "print(heavy, time.perf_counter() - t, file=sys.stderr)\n"
        "assert not heavy, heavy\n" % (args,)
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "usage: grpo" in proc.stdout
    assert time.perf_counter() - t0 < 2.0


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    cases = {
        '{"prompt": "a", "answer": 1}\n[1, 2]\n': ":2: a row must be a JSON object",
        '{"prompt": "a", "answer": 1}\n{"answer": 1}\n': ":2: missing or empty required field 'prompt'",
        '{"prompt": "a", "answer": 1}\n{"prompt": "a", "answer": 1}\n{oops\n': ":3: not valid JSON",
    }
    for text, fragment in cases.items():
        f.write_text(text)
        with pytest.raises(DatasetError, match=fragment.replace("[", r"\[")):
            load_jsonl(f)
    f.write_text('{"prompt": "a", "answer": 3, "extra": [1]}\n')
    assert load_jsonl(f) == [{"prompt": "a", "answer": 3, "extra": [1]}]


def test_arithmetic_split_is_seeded_and_disjoint():
    cfg = DataConfig(max_operand=9, rl_share=0.3, eval_share=0.1, seed=1)
    sft, rl = arithmetic_rows(cfg)
    held_out = arithmetic_split(cfg)["eval"]
    assert (len(sft), len(rl), len(held_out)) == (60, 30, 10)
    prompts = [{r["prompt"] for r in part} for part in (sft, rl, held_out)]
    assert len(set().union(*prompts)) == 100  # the three parts are disjoint and cover every pair
    assert arithmetic_rows(cfg) == (sft, rl)
    row = next(r for r in rl)
    a, b = map(int, row["prompt"][:-1].split("+"))
    assert row["answer"] == str(a + b)
    assert accuracy_reward(row["reference"], row).value == 1.0 and format_reward(row["reference"], row) == 1.0


def test_prompt_stream_resumes_at_its_cursor():
    rows = [{"prompt": str(i), "answer": i} for i in range(7)]
    a = PromptStream(rows, seed=3)
    first = a.take(10)
    rest = a.take(5)
    b = PromptStream(rows, seed=3, cursor=10)
    assert b.take(5) == rest
    assert sorted(r["answer"] for r in first[:7]) == list(range(7))  # each epoch is a permutation


def test_verifiers():
    row = {"answer": "19"}
    good = reference_completion(12, 7)
    assert good == "<think>2+7=9</think><answer>19</answer>"
    assert format_reward(good, row) == 1.0 and accuracy_reward(good, row).value == 1.0
    # the right answer inside <think> does not count; the answer tag is wrong
    assert accuracy_reward("<think><answer>19</answer></think><answer>18</answer>", row).value == 0.0
    assert extract_answer("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert accuracy_reward("<think>x</think><answer>19.0</answer>", row).value == 1.0
    assert accuracy_reward("<think>x</think><answer></answer>", row).value == 0.0
    for bad in ["<answer>19</answer>", "<think>a</think>", "<think>a</think><answer>1</answer><answer>2</answer>",
                "<answer>1</answer><think>a</think>", "<think><think>a</think></think><answer>1</answer>",
                "x<think>a</think><answer>1</answer>", "<think>a</think><answer>1"]:
        assert format_reward(bad, row) == 0.0, bad
    assert format_reward("  <think>a\nb</think>\n<answer>1</answer> ", row) == 1.0


def test_resume_without_checkpoint_fails_before_starting_anything(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"run:\n  output_dir: {tmp_path}\n")
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--resume", str(run)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no complete checkpoint" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no model built, nothing written


@pytest.mark.parametrize("extra, field", [(["learner.lora.rank=8"], "learner.lora.rank"),
                                          (["learner.zero_stage=3"], "ZeRO-3"),
                                          (["sync.delta=false", "learner.lora.push=adapter"], "learner.lora.push=adapter"),
                                          (["sync.delta=false", "learner.lora.push=merged2"], "learner.lora.push")])
def test_sync_delta_is_refused_where_it_cannot_work(extra, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, ["sync.delta=true", *extra])
