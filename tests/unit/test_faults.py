"""The fault limit: past faults.max_restarts for one kind the job fails, naming what
failed (the chaos runs themselves are in tests/e2e/test_faults.py)."""


def test_too_many_faults_fail_the_job_naming_what_failed():
    import pytest

    from cluster.actors.faults import FaultLimit
    from cluster.actors.supervisor import Supervisor
    from cluster.config import FaultConfig

    sup = Supervisor(FaultConfig(max_restarts=1), 1.0, None, [], None, 0, log=lambda m: None)
    sup.close()
    sup.record("reward worker", 0, "died (ActorDiedError)")  # within the limit
    with pytest.raises(FaultLimit, match=r"reward worker failed 2 times \(faults.max_restarts=1\); last: reward worker 1: hung"):
        sup.record("reward worker", 1, "hung")
    assert sup.summary()["counts"] == {"reward worker": 2}
