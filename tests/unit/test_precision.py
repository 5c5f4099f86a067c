"""learner.dtype: auto -> bf16 where the device computes it natively (learner/precision.py)."""
import sys
import types

import pytest

from learner.precision import cpu_flags, native_bf16, resolve

EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu avx512_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo():
    assert {"avx512_bf16", "avx512f"} <= cpu_flags(EPYC) and "processor" not in cpu_flags(EPYC)
    assert {"bf16", "sve"} <= cpu_flags(GRAVITON3)
    assert cpu_flags("model name\t: something\n") == set()


@pytest.mark.parametrize("text, want", [(EPYC, "bfloat16"), (SKYLAKE, "float32"), (GRAVITON3, "bfloat16"),
                                        ("flags\t: amx_bf16 amx_tile\n", "bfloat16"), ("", "float32")])
def test_auto_is_bf16_only_with_bf16_instructions(text, want):
    dtype, why = resolve("auto", "cpu", cpu_flags(text))
    assert dtype == want and why.startswith("auto: ")
    assert ("no bf16" in why) == (want == "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dtype_that_is_set_is_kept_whatever_the_hardware(dtype):
    assert resolve(dtype, "cpu", cpu_flags(SKYLAKE)) == (dtype, "set in learner.dtype")
    assert resolve(dtype, "cpu", cpu_flags(EPYC))[0] == dtype


def test_the_default_is_auto_and_an_unknown_dtype_is_refused_by_name():
    from cluster.config import ConfigError, load_config

    assert load_config(None, []).learner.dtype == "auto"
    with pytest.raises(ConfigError, match="learner.dtype"):
        load_config(None, ["learner.dtype=float16"])


def test_this_machine_resolves_from_its_own_cpuinfo():
    from pathlib import Path

    text = Path("/proc/cpuinfo").read_text()  # read here apart from cpu_flags: a word search of the flag lines
    words = {w for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for w in line.split(":", 1)[1].split()}
    assert words and native_bf16("cpu")[0] == bool({"avx512_bf16", "amx_bf16", "bf16"} & words)


def test_the_compute_bound_cpu_example_is_valid_and_colocated_bf16():
    from cluster.config import load_config
    from tests.helpers import EXAMPLES

    cfg = load_config(EXAMPLES / "cpu" / "compute-bound.yaml")  # every key known, every value valid
    assert cfg.cluster.placement == "colocated" and cfg.run.max_staleness == 0
    assert cfg.rollout.dtype == "bfloat16" and cfg.learner.dtype == "auto" and cfg.learner.max_tokens_per_micro == 3456


def test_grpo_bench_peer_reads_a_config_file(monkeypatch):
    import benchmarks.peer as peer

    seen = {}

    def stop(path, overrides):
        seen.update(path=path, overrides=overrides)
        raise SystemExit(0)
    monkeypatch.setattr("cluster.config.load_config", stop)
    monkeypatch.setitem(sys.modules, "trl", types.ModuleType("trl"))  # the bench extra need not be installed
    with pytest.raises(SystemExit):
        peer.main(["--config", "x.yaml", "--steps", "9", "rollout.n=2"])
    assert seen["path"] == "x.yaml" and "run.steps=9" in seen["overrides"] and seen["overrides"][-1] == "rollout.n=2"
