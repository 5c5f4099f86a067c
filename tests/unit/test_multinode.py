"""Placement on a cluster without one: the fit check names the role and what it lacks,
and the cluster example config is valid (the runs across nodes are in
tests/e2e/test_multinode.py)."""
import pytest

from cluster.actors.placement import PlacementError, Role, check_fits
from cluster.config import load_config
from tests.helpers import EXAMPLES

EXAMPLE = EXAMPLES / "cluster" / "grpo-qwen2.5-1.5b-math.yaml"


def test_placement_check_names_the_role_and_what_it_lacks():
    nodes = [{"CPU": 2.0, "gen": 1.0}, {"CPU": 2.0, "learn": 2.0}]
    roles = [Role("generator", 1, {"CPU": 1.0, "gen": 1.0}), Role("learner rank", 2, {"CPU": 1.0, "learn": 1.0}),
             Role("reward worker", 1, {"CPU": 0.1, "cpu": 1.0})]
    with pytest.raises(PlacementError, match=r"reward worker 0 needs \{'CPU': 0.1, 'cpu': 1.0\}.*'cpu': 0"):
        check_fits(roles, nodes)
    check_fits(roles[:2], nodes)  # two ranks pack on the learn node, the generator on the gen node
    with pytest.raises(PlacementError, match="learner rank 1 needs"):
        check_fits([Role("learner rank", 2, {"CPU": 1.5, "learn": 1.0})], nodes)


def test_the_cluster_example_config_is_valid():
    cfg = load_config(EXAMPLE)  # every key known, every value valid
    assert cfg.sync.backend == "nccl" and cfg.rollout.tensor_parallel_size == 2 and cfg.learner.zero_stage == 3
    assert cfg.data.template == "r1_zero" and cfg.cluster.generator_resources == {"rollout_node": 1.0}
