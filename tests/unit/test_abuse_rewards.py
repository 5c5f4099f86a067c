"""Abuse of the reward side's small pure parts: broken verifier config, verifier modules
that fail to import, what a verifier may put in `info`, a verifier that fails on every
sample, and the environment a verifier process starts from. No process is started."""
import json
import os
import tempfile
import uuid

import msgpack
import pytest
from pydantic import ValidationError

from rewards.api import ErrorStreak, VerifierError, normalize, resolve
from rewards.config import ExternalVerifier, RewardConfig, VerifierSpec, split_address
from rewards.protocol import plain
from rewards.spawn import minimal_env
from rollout.types import Group, Sample


# ------------------------------------------------------------------ config at load
@pytest.mark.parametrize("entry, fragment", [
    ({"command": []}, "command is empty"),
    ({"command": [""]}, "command is empty"),
    ({"address": "host:notaport"}, "not host:port"),
    ({"address": "host:"}, "not host:port"),
    ({"address": ":9000"}, "not host:port"),
    ({"address": "host:70000"}, "not host:port"),
    ({"address": "host"}, "not host:port"),
])
def test_a_broken_external_verifier_is_refused_at_load(entry, fragment):
    with pytest.raises(ValidationError, match=fragment):
        RewardConfig(verifiers={"ext": 1.0}, external={"ext": entry})


def test_good_addresses_and_env_names_load():
    assert split_address("localhost:9000") == ("localhost", 9000)
    assert split_address("[::1]:9000") == ("::1", 9000)
    assert ExternalVerifier(address="10.0.0.1:1", env=["API_KEY"]).env == ["API_KEY"]
    assert VerifierSpec(env=["HF_TOKEN", "_X1"]).env == ["HF_TOKEN", "_X1"]
    with pytest.raises(ValidationError, match="not names of environment variables"):
        VerifierSpec(env=["A=B"])
    assert RewardConfig().max_error_steps == 3
    assert VerifierSpec().env == [] and ExternalVerifier(command=["x"]).env == []


# ------------------------------------------------- modules that fail at import
@pytest.mark.parametrize("source, what", [
    ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    ("def f(:\n    pass\n", "SyntaxError"),
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    ("x = {}['missing']\n", "KeyError: 'missing'"),
])
def test_a_module_that_fails_at_import_is_one_line_naming_it(tmp_path, monkeypatch, source, what):
    module = f"broken_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{module}.py"
    path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(VerifierError) as e:
        resolve(f"{module}:f")
    message = str(e.value)
    assert "\n" not in message and what in message and str(path) in message, message
    assert f"verifier '{module}:f' cannot be imported" in message


def test_a_missing_attribute_names_the_module_file(tmp_path, monkeypatch):
    module = f"fine_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text("def g(c, f):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(VerifierError, match="has no attribute 'f'"):
        resolve(f"{module}:f")
    assert resolve(f"{module}:g")("x", {}) == 1.0


# --------------------------------------------------------------- what info holds
def test_info_that_json_and_msgpack_cannot_carry_is_coerced():
    score = normalize((1.0, {"raw": b"\xff\x00ok", "keys": {1: b"one", (2, 3): "p"}, "tags": {"a"},
                             "huge": 2**80, "obj": object()}))
    info = score.info
    assert info["raw"] == "\\xff\x00ok" and info["keys"] == {"1": "one", "[2, 3]": "p"}
    assert info["tags"] == ["a"] and info["huge"] == str(2**80) and info["obj"].startswith("<object object")
    assert msgpack.unpackb(msgpack.packb(info), raw=False) == info
    assert json.loads(json.dumps(info)) == info
    deep: list = []
    for _ in range(100):
        deep = [deep]
    json.dumps(plain({"deep": deep}))  # nesting is cut, never a RecursionError


# --------------------------------------------------------- failing on every sample
def _groups(*infos_per_group):
    """Groups whose verifier "v" reported these infos, one group per argument."""
    out = []
    for infos in infos_per_group:
        samples = [Sample([1], [0.0], "x", "stop", [(0, 0)]) for _ in infos]
        out.append(Group([1], "p", {}, samples, rewards=[0.0] * len(infos), reward_parts={"v": [0.0] * len(infos)},
                         reward_info={"v": list(infos), "ok": [{} for _ in infos]}))
    return out


def test_error_streak_stops_a_verifier_that_fails_on_every_sample():
    streak = ErrorStreak(3)
    bad = [{"error": "boom 1"}, {"error": "boom 2"}]
    streak.update(_groups(bad, bad))
    streak.update(_groups(bad))
    streak.update(_groups(bad[:1], [{}]))  # one answered sample resets the count
    streak.update([])  # a step without samples leaves it
    streak.update(_groups(bad))
    streak.update(_groups(bad))
    with pytest.raises(VerifierError) as e:
        streak.update(_groups(bad, [{"error": "last one"}]))
    assert "verifier 'v' failed on every sample for 3 consecutive steps" in str(e.value)
    assert "last error: last one" in str(e.value) and "'ok'" not in str(e.value)


def test_error_streak_off():
    streak = ErrorStreak(0)
    for _ in range(10):
        streak.update(_groups([{"error": "boom"}]))


# ----------------------------------------------------- the environment of a child
def test_a_verifier_process_environment_is_minimal_and_explicit(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET", "hunter2")
    monkeypatch.setenv("GRPO_TEST_PASSED", "named")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = minimal_env(["GRPO_TEST_PASSED"], home="/tmp/h", python=True)
    assert "GRPO_TEST_SECRET" not in env and "hunter2" not in json.dumps(env)
    assert env["GRPO_TEST_PASSED"] == "named" and env["HOME"] == "/tmp/h" and env["LANG"] == "C.UTF-8"
    assert "PYTHONPATH" in env and "PYTHONPATH" not in minimal_env()
    assert set(minimal_env()) <= {"PATH", "LD_LIBRARY_PATH", "PYTHONHOME", "VIRTUAL_ENV", "LANG", "LC_ALL", "LC_CTYPE",
                                  "TZ", "TMPDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                  "TOKENIZERS_PARALLELISM", "GRPO_CODE_SANDBOX"}


def test_throwaway_homes_of_dead_processes_are_swept(tmp_path, monkeypatch):
    from rewards import spawn

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(spawn, "_homes", {})
    dead, live = tmp_path / "grpo-verifier-home-999999999", tmp_path / f"grpo-verifier-home-{os.getppid()}"
    dead.mkdir()
    live.mkdir()
    home = spawn.throwaway_home()
    assert home == str(tmp_path / f"grpo-verifier-home-{os.getpid()}") and os.path.isdir(home)
    assert not dead.exists() and live.exists()
    assert spawn.throwaway_home() == home
