"""Checkpoints are loaded without unpickling code (issue 19, item 8): a pickle payload
put into any file the learner's loader reads never runs, and the refusal names the
file; a clean checkpoint written by our learner (ZeRO 1: model and optimizer files)
still loads, and training goes on from it exactly."""
import os
import shutil

import pytest
import ray
import torch

from cluster.actors.factory import ActorFactory
from learner.checkpoint_engine import UnsafeCheckpoint
from tests.helpers import placed, synthetic_groups


class Payload:
    """Unpickling this creates a file: proof that code ran on load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def group(tiny_model, ray_session):
    cfg = placed(["learner.zero_stage=1", "run.prompts_per_step=4", "rollout.n=4", "cluster.learner_cpus=0.5",
                  "learner.lr=0.01"])
    learners = ActorFactory.for_job(cfg, str(tiny_model)).learner_group()
    ray.get([r.ready.remote() for r in learners.ranks], timeout=300)
    yield learners
    learners.kill()


def test_a_pickle_payload_in_any_checkpoint_file_never_runs_and_is_named(group, tmp_path):
    group.train(synthetic_groups(seed=1))
    clean = tmp_path / "clean"
    group.save_checkpoint(str(clean))
    files = sorted(p.relative_to(clean) for p in clean.rglob("*.pt"))
    assert len(files) >= 2  # model states and optimizer states
    for rel in files:
        poisoned = tmp_path / f"poisoned-{rel.name}"
        shutil.copytree(clean, poisoned)
        marker = tmp_path / f"ran-{rel.name}"
        torch.save({"module": Payload(str(marker))}, poisoned / rel)
        with pytest.raises(UnsafeCheckpoint, match=rel.name):
            group.load_checkpoint(str(poisoned))
        assert not marker.exists(), f"unpickling {rel} ran code"


def test_a_clean_checkpoint_loads_and_training_goes_on_from_it_exactly(group, tmp_path):
    group.train(synthetic_groups(seed=2))
    group.save_checkpoint(str(tmp_path / "ck"))
    after = group.train(synthetic_groups(seed=3))["train/loss"]
    group.load_checkpoint(str(tmp_path / "ck"))  # safe loading: weights, optimizer, RNG
    again = group.train(synthetic_groups(seed=3))["train/loss"]
    assert again == pytest.approx(after, rel=1e-5, abs=1e-7)
