"""The environment contract (rewards/envs.py) on the built-in python tool (real code
sandbox processes) and a scripted environment named by import path."""
import pytest

from rewards.envs import ENVS, EnvError, PythonTool, Step, resolve_env, start


class Scripted:
    """Answers the first turn with a fixed observation, then ends the episode with a reward."""

    def __init__(self, observation: str = "<output>3</output>") -> None:
        self.observation, self.turns = observation, []

    def reset(self, row):
        self.row = row

    def step(self, turn):
        self.turns.append(turn)
        return Step(self.observation) if len(self.turns) == 1 else Step(None, done=True, reward=0.5)


def test_every_built_in_environment_keeps_the_contract():
    for name, cls in ENVS.items():
        env = start(name, {"prompt": "p", "answer": "1"})
        result = env.step("no tool call here, so the answer")
        assert isinstance(result, Step) and result.done and result.observation is None, name
        assert isinstance(cls.stop, list) and all(isinstance(s, str) and s for s in cls.stop)


def test_the_python_tool_runs_the_last_call_in_the_sandbox_and_bounds_what_comes_back():
    env = start("python", {}, {"timeout_s": 2.0, "max_output_chars": 64})
    ok = env.step("I will compute it. <python>print(123456789 * 987654321)</python>")
    assert ok == Step("<output>121932631112635269\n</output>", info={"tool_call": 1, "tool_error": 0})
    crash = env.step("<python>print(1)</python> then <python>1 / 0</python>")  # the last call runs
    assert crash.observation == "<output>error: ZeroDivisionError: division by zero</output>" and not crash.done
    assert crash.info["tool_error"] == 1
    hang = env.step("<python>while True: pass</python>")
    assert hang.observation == "<output>error: timed out after 2 s</output>" and hang.info["tool_error"] == 1
    long = env.step("<python>print('x' * 1000)</python>")
    assert long.observation == "<output>" + "x" * 64 + "...(truncated)</output>"


def test_an_environment_at_an_import_path_bad_names_and_no_secret_in_tool_code(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET", "x")
    secret = PythonTool().step("<python>import os; print(sorted(k for k in os.environ if 'SECRET' in k))</python>")
    assert secret.observation == "<output>[]\n</output>"  # nothing of ours reaches model code
    env = start("tests.integration.test_envs:Scripted", {"answer": "3"}, {"observation": "<o>"})
    assert env.step("<python>1</python>") == Step("<o>") and env.step("3").reward == 0.5
    with pytest.raises(EnvError, match="unknown environment 'pyhton'.*python"):
        resolve_env("pyhton")
    with pytest.raises(EnvError, match="cannot be imported"):
        resolve_env("no_such_module_here:Env")
    with pytest.raises(EnvError, match="not an environment class"):
        resolve_env("tests.integration.test_envs:Step.__init__")
    with pytest.raises(ValueError, match="timeout_s"):
        PythonTool(timeout_s=0)
