"""Starting the job's actors: generators, reward workers, the learner group.

An `ActorFactory` holds the config sections the actors are built from (named in its
signature) and the model they start on; the supervisor starts replacements through
the same factory, so a replacement is placed and configured exactly like the actor
it replaces. Every actor gets its resources from the resolved ClusterConfig (see
placement.place); learner ranks share one placement group (PACK) so they land
together. The same code serves CPU and GPU clusters.
"""
from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors.learners import LearnerGroup
from cluster.actors.placement import PlacementError, alive_nodes, core_sets, log_env, pair_bundle, thread_env
from cluster.config import ClusterConfig, Config
from learner.config import LearnerConfig
from learner.learner import Learner
from rewards.config import EnvConfig, RewardConfig
from rewards.worker import RewardWorker
from rollout.config import RolloutConfig, WeightSyncConfig
from rollout.generator import ENGINE_ENV, Generator

GENERATOR_CONCURRENCY = 8
"""Calls a generator actor serves at once (collect long-polls, submissions, weight
sync, probes): the engine itself is only ever touched by its own loop thread."""


def generator_options(rollout: RolloutConfig, cluster: ClusterConfig, index: int = 0,
                      cores: list[int] | None = None) -> dict[str, Any]:
    """Ray options of a generator actor (benchmarks give raw engines the same)."""
    env = {**ENGINE_ENV, **thread_env(cluster.generator_threads, cores, cluster.placement == "colocated")}
    env.update({k: os.environ[k] for k in env if k in os.environ})  # a variable the user exported wins
    env.update(log_env(f"generator-{index}"))
    return {"num_cpus": cluster.generator_cpus, "num_gpus": cluster.generator_gpus,
            "resources": dict(cluster.generator_resources) or None,
            "runtime_env": {"env_vars": env}, "max_concurrency": GENERATOR_CONCURRENCY}


@ray.remote
def address_and_port(local: bool) -> tuple[str, int]:
    """An address of this node (loopback when `local`) and a free port on it."""
    from rollout.weight_sync import rendezvous_port

    return ("127.0.0.1" if local else ray.util.get_node_ip_address()), rendezvous_port()


class ActorFactory:
    def __init__(self, model_path: str, rollout: RolloutConfig, rewards: RewardConfig, learner: LearnerConfig,
                 sync: WeightSyncConfig, cluster: ClusterConfig, *, total_steps: int, sequences_per_step: int,
                 step_timeout_s: float, env: EnvConfig | None = None) -> None:
        self.model_path, self.env = model_path, env
        self.rollout, self.rewards, self.learner, self.sync, self.cluster = rollout, rewards, learner, sync, cluster
        self.total_steps, self.sequences_per_step, self.step_timeout_s = total_steps, sequences_per_step, step_timeout_s
        self._tp_groups: dict[int, Any] = {}  # generator index -> its placement group (tensor parallel)
        self._pairs: Any = None  # colocated: the pairs' placement group, kept across learner restarts
        self.colocated = cluster.placement == "colocated"
        # colocated on GPUs: generators sleep (vLLM's sleep mode) while their learner rank trains
        self.sleeps = self.colocated and cluster.generator_gpus > 0

    @classmethod
    def for_job(cls, cfg: Config, model_path: str) -> "ActorFactory":
        """The factory of a resolved job config (placement.place): its sections, unpacked."""
        return cls(model_path, cfg.rollout, cfg.rewards, cfg.learner, cfg.sync, cfg.cluster,
                   total_steps=cfg.run.steps, sequences_per_step=cfg.run.prompts_per_step * cfg.rollout.n,
                   step_timeout_s=cfg.faults.step_timeout_s, env=cfg.env)

    def pairs(self) -> Any:
        """Colocated: one placement group of one bundle per pair (PACK), made once; learner
        rank i and generator i are scheduled in bundle i. It outlives any one learner group,
        so the generators placed in it survive a learner restart."""
        if self._pairs is None:
            bundle, n = pair_bundle(self.cluster), self.learner.num_ranks
            self._pairs = placement_group([bundle] * n, strategy="PACK")
            try:
                ray.get(self._pairs.ready(), timeout=self.cluster.start_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise PlacementError(f"the cluster cannot place {n} colocated pair(s) of {bundle} (PACK) within "
                                     f"cluster.start_timeout_s={self.cluster.start_timeout_s:g} s") from None
        return self._pairs

    def cores(self) -> dict[str, list[int]]:
        return core_sets(self.cluster, self.rollout.num_generators, self.learner.num_ranks, alive_nodes())

    # ------------------------------------------------------------ generators
    def generator(self, index: int, version: int = 0, model_path: str | None = None) -> Any:
        """A generator actor. With rollout.tensor_parallel_size > 1 (GPUs) it gets a placement
        group of its own, TP GPU bundles on one node (STRICT_PACK); vLLM's Ray executor puts
        its TP workers on those bundles (VLLM_RAY_BUNDLE_INDICES), the actor itself needs none.
        Not run on this project's CPU machines."""
        options = generator_options(self.rollout, self.cluster, index, self.cores().get(f"generator {index}"))
        tp = self.rollout.tensor_parallel_size
        if tp > 1:
            if index in self._tp_groups:  # a replacement: the old engine's group goes first
                ray.util.remove_placement_group(self._tp_groups.pop(index))
            bundle = {"GPU": self.cluster.generator_gpus or 1.0, "CPU": self.cluster.bundle_cpus,
                      **self.cluster.generator_resources}
            pg = self._tp_groups[index] = placement_group([bundle] * tp, strategy="STRICT_PACK")
            try:
                ray.get(pg.ready(), timeout=self.cluster.start_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise PlacementError(f"generator {index}: no node has {tp} bundles of {bundle} free") from None
            options.update(num_gpus=0, resources=None, scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_capture_child_tasks=True))
            options["runtime_env"]["env_vars"]["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, range(tp)))
        elif self.colocated:
            options.update(resources=None, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pairs(), placement_group_bundle_index=index))
        lora = self.learner.lora
        return ray.remote(Generator).options(**options).remote(model_path or self.model_path, self.rollout, index,
                                                               version, lora.rank if lora.push == "adapter" else 0,
                                                               self.sleeps)

    def generators(self, version: int = 0, model_path: str | None = None) -> list[Any]:
        return [self.generator(i, version, model_path) for i in range(self.rollout.num_generators)]

    # ------------------------------------------------------------ reward workers
    def reward_worker(self, index: int) -> Any:
        return ray.remote(RewardWorker).options(
            num_cpus=self.cluster.reward_cpus, resources=dict(self.cluster.reward_resources) or None,
            runtime_env={"env_vars": log_env(f"reward-worker-{index}")}).remote(self.rewards, index, self.env)

    def reward_workers(self) -> list[Any]:
        return [self.reward_worker(i) for i in range(self.rewards.num_workers)]

    # ------------------------------------------------------------ learner
    def learner_group(self, model_path: str | None = None) -> LearnerGroup:
        """All learner ranks in one PACK placement group; rank 0 hosts the rendezvous."""
        n, c = self.learner.num_ranks, self.cluster
        pg = self.pairs() if self.colocated else self._learner_group_pg()
        # Rank 0 hosts the DeepSpeed rendezvous: take an address and port on its node
        # (loopback only for a single rank on a single-node cluster).
        master_addr, master_port = ray.get(
            address_and_port.options(
                num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
            ).remote(n == 1 and len(alive_nodes()) == 1),
            timeout=c.start_timeout_s,
        )
        dist_backend = "nccl" if c.learner_gpus else "gloo"
        cores = self.cores()
        ranks = [
            ray.remote(Learner).options(
                num_cpus=c.learner_cpus, num_gpus=c.learner_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                runtime_env={"env_vars": {**thread_env(c.learner_threads, cores.get(f"learner {rank}"), self.colocated),
                                          **log_env(f"learner-{rank}")}},
            ).remote(
                model_path or self.model_path, self.learner, rank, n, master_addr, master_port,
                self.sequences_per_step, self.total_steps, self.rollout.temperature, self.rollout.max_tokens,
                dist_backend, self.step_timeout_s,
            )
            for rank in range(n)
        ]
        return LearnerGroup(ranks, None if self.colocated else pg, self.learner, self.sync, self.sequences_per_step,
                            self.step_timeout_s)

    def _learner_group_pg(self) -> Any:
        n, c = self.learner.num_ranks, self.cluster
        bundle = {"CPU": c.learner_cpus, **c.learner_resources}
        if c.learner_gpus:
            bundle["GPU"] = c.learner_gpus
        pg = placement_group([bundle] * n, strategy="PACK")  # on as few nodes as fit, spread when they do not
        try:
            ray.get(pg.ready(), timeout=c.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(pg)
            raise PlacementError(f"the cluster cannot place {n} learner rank(s) of {bundle} (PACK) "
                                 f"within cluster.start_timeout_s={c.start_timeout_s:g} s") from None
        return pg
