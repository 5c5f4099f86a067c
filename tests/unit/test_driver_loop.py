"""The driver loop (cluster/commands/train.py `drive`) with a fake run of our own small
interface: a learner fault in any part of a step, the checkpoint save included (issue
19, item 3), restarts the learner group from the last checkpoint and redoes the steps
after it; nothing else escapes as a traceback."""
from types import SimpleNamespace

import pytest

from cluster.actors.faults import LearnerFault
from cluster.commands.train import drive


class FakeRun:
    def __init__(self, steps: int, checkpoint_every: int, fail_in: dict[str, int]):
        self.cfg = SimpleNamespace(run=SimpleNamespace(steps=steps, checkpoint_every=checkpoint_every))
        self.state = {"step": 0}
        self.fail_in = dict(fail_in)  # part -> the 1-based step it fails at, once
        self.log: list[str] = []
        self.saved = 0

    def _maybe_fail(self, part: str, step: int) -> None:
        if self.fail_in.get(part) == step:
            del self.fail_in[part]
            raise LearnerFault(f"rank 1 died during {part}")

    def step(self, step):
        self._maybe_fail("step", step + 1)
        self.log.append(f"step {step + 1}")
        return {"step": step + 1}

    def maybe_evaluate(self, step):
        return {}

    def log_step(self, row):
        self.log.append(f"logged {row['step']}")

    def checkpoint(self, step):
        self._maybe_fail("checkpoint", step)
        self.saved = step
        self.log.append(f"checkpoint {step}")

    def restart_learners(self, cause):
        self.log.append(f"restart from {self.saved}: {cause}")
        return self.saved

    def finish(self):
        return {"log": self.log}


def test_a_learner_lost_while_saving_a_checkpoint_restarts_from_the_one_before():
    run = FakeRun(steps=6, checkpoint_every=2, fail_in={"checkpoint": 4})
    log = drive(run)["log"]
    restart = log.index("restart from 2: rank 1 died during checkpoint")
    assert log[:restart] == ["step 1", "logged 1", "step 2", "logged 2", "checkpoint 2", "step 3", "logged 3",
                             "step 4", "logged 4"]
    assert log[restart + 1:] == ["step 3", "logged 3", "step 4", "logged 4", "checkpoint 4", "step 5", "logged 5",
                                 "step 6", "logged 6", "checkpoint 6"]


def test_a_learner_lost_in_a_train_step_redoes_only_the_steps_after_the_checkpoint():
    log = drive(FakeRun(steps=4, checkpoint_every=2, fail_in={"step": 4}))["log"]
    assert log.count("checkpoint 2") == 1 and log.count("step 3") == 2 and log[-1] == "checkpoint 4"


def test_any_other_error_is_not_taken_for_a_learner_fault():
    run = FakeRun(steps=2, checkpoint_every=1, fail_in={})
    run.checkpoint = lambda step: (_ for _ in ()).throw(OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        drive(run)
