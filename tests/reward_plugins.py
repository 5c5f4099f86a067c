"""Misbehaving verifiers for the reward-worker tests (named by import path)."""
import os
import time


def crash(completion: str, fields: dict) -> float:
    if "crash" in completion:
        os._exit(3)
    return 1.0


def raises(completion: str, fields: dict) -> float:
    if "raise" in completion:
        raise RuntimeError("verifier bug")
    return 1.0


def sleepy(completion: str, fields: dict) -> float:
    if "sleep" in completion:
        time.sleep(60)
    return 1.0


def chatty(completion: str, fields: dict) -> float:
    print("verifiers that print must not corrupt the protocol")
    return 0.5


def keyerror(completion: str, fields: dict) -> float:
    return float(fields["no_such_field"])  # a bug in the verifier: a KeyError of its own


def not_finite(completion: str, fields: dict) -> float:
    return float(completion)  # "nan", "inf", "-inf" parse to non-finite floats


def napper(completion: str, fields: dict) -> float:
    if completion.startswith("nap"):
        time.sleep(0.3)
    return 1.0


# ------------------------------------------------------------ environments (multi-turn episodes)
class TwoTurns:
    """A scripted episode: the first model turn gets `observation`, the second ends the
    episode with a reward of the environment's own (from the turn's length, so that a
    group's rewards differ)."""

    def __init__(self, observation: str = "ing the<output>42</output>") -> None:
        self.observation = observation

    def reset(self, row):
        self.turns = 0

    def step(self, turn):
        from rewards.envs import Step

        self.turns += 1
        if self.turns == 1:
            return Step(self.observation, info={"tool_call": 1})
        return Step(None, done=True, reward=(len(turn) % 5) / 4)


class Chaos(TwoTurns):
    """TwoTurns, whose process dies at the second step of the first episode to get there
    (once per marker file), and whose tool call hangs in the sandbox on the first turn of
    row `hang_tool`, and whose own step hangs on row `hang_step`."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def reset(self, row):
        super().reset(row)
        self.row = row

    def step(self, turn):
        from rewards.envs import PythonTool

        if self.turns == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(3)
        if self.row.get("case") == "hang_step" and self.turns == 1:
            time.sleep(600)
        if self.row.get("case") == "hang_tool" and self.turns == 0:
            self.turns += 1
            return PythonTool(timeout_s=1.0).step("<python>while True: pass</python>")
        return super().step(turn)
