"""W&B as a logger, offline: a real wandb run (its own service process) is written
with every logged key."""
import pytest


def test_wandb_offline_writes_its_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from cluster.artifacts.loggers import Loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = Loggers(["wandb"], tmp_path, {"learner": {"lr": 1e-3}})
    for step in (1, 2, 3):
        loggers.log({"step": step, "reward_mean": 0.25 * step, "train/loss": 1.0 / step, "note": "text"}, [])
    loggers.close()
    [run] = list((tmp_path / "wandb").glob("offline-run-*"))
    [events] = list(run.glob("run-*.wandb"))
    body = events.read_bytes()
    assert len(body) > 1000 and b"reward_mean" in body and b"train/loss" in body
