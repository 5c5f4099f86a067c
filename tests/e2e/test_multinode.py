"""Beyond one machine, tested on one box: a Ray cluster of three nodes (three `ray start`
processes, each with its own custom resource), generators, learner and reward workers
pinned to different nodes by `cluster:` settings, the weights crossing nodes over the
learner node's address (never loopback), and the same job through `ray job submit`;
and `grpo train` with a role that fits no node fails fast, naming it."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import FULL_RUN, kill_session, own_ports, start_head

PLACED = ["eval.every=0", "cluster.generator_resources={gen: 1}", "cluster.learner_resources={learn: 1}",
          "cluster.reward_resources={cpu: 1}"]


def test_an_unplaceable_role_fails_fast(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "cluster.reward_resources={cpu_node: 1}",
                           "cluster.num_cpus=2", f"run.output_dir={tmp_path}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and time.perf_counter() - t0 < 30
    assert "reward worker 0 needs" in proc.stderr and "cpu_node" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing built or written


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """Head (gen) with a dashboard, and two more nodes (learn, cpu) joined to it."""
    tmp = tmp_path_factory.mktemp("cluster")
    from ray.util import get_node_ip_address

    ip = get_node_ip_address()  # the machine's own address: what each node of a real cluster has
    head, dash, address = start_head(tmp, num_cpus=2, resources={"gen": 1}, node_ip=ip)
    workers = []
    try:
        import ray

        deadline = time.monotonic() + 180
        # one node after the other: two raylets starting at once in one session both bind the
        # session's sockets/plasma_store, and the second aborts ("Address already in use")
        for count, (name, cpus) in enumerate((("learn", 2), ("cpu", 1)), start=2):
            workers.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", "--block", f"--address={address}",
                 f"--num-cpus={cpus}", f"--node-ip-address={ip}", f"--resources={json.dumps({name: 1})}",
                 "--disable-usage-stats", "--object-store-memory=300000000", *own_ports()],
                env={**os.environ, "RAY_AUTH_MODE": "disabled"}, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=(tmp / f"{name}.err").open("w")))
            while True:
                ray.init(address=address, logging_level="ERROR")
                alive = [n for n in ray.nodes() if n["Alive"]]
                ray.shutdown()
                if len(alive) == count:
                    break
                assert time.monotonic() < deadline, f"only {len(alive)} of {count} nodes came up: " + \
                    (tmp / f"{name}.err").read_text()[-1500:]
                time.sleep(1)
        yield address, dash, alive
    finally:
        for p in workers + [head]:
            kill_session(p.pid)


def check_placed_run(run_dir: Path, nodes: list[dict]) -> None:
    by_id = {n["NodeID"]: n for n in nodes}
    actors = json.loads((run_dir / "actors.json").read_text())

    def resource_of(name):
        node = by_id[actors[name]["node_id"]]
        return next(r for r in ("gen", "learn", "cpu") if r in node["Resources"])

    assert resource_of("generator 0") == "gen" and resource_of("learner rank 0") == "learn"
    assert resource_of("reward worker 0") == "cpu"
    # the generator dialled the learner node's address, not its own loopback
    learner_ip = by_id[actors["learner rank 0"]["node_id"]]["NodeManagerAddress"]
    host = actors["generator 0"]["sync_peer"].rsplit(":", 1)[0]
    assert host == learner_ip and not host.startswith("127.")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # after every update the generator on another node samples with exactly the learner's weights
    assert all(r["train/sampler_logprob_diff"] < 1e-4 for r in rows)
    assert (run_dir / "checkpoints" / "step-3" / "run_state.json").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(run_dir / "checkpoints" / "step-3" / "hf"))


def test_a_run_across_three_nodes(three_nodes, runs_dir):
    """`grpo train` submitted with `ray job submit` to the three-node cluster's head (the
    job's driver joins that cluster, as it would on a real one)."""
    address, dash, nodes = three_nodes
    args = [arg for arg in FULL_RUN if not arg.startswith(("run.steps", "cluster.num_cpus", "run.checkpoint_every"))]
    entry = [sys.executable, "-m", "cluster.cli", "train", *args, *PLACED, "run.steps=3", "run.checkpoint_every=3",
             "run.name=multinode-job", f"run.output_dir={runs_dir}"]
    job = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit",
                          f"--address=http://127.0.0.1:{dash}", "--", *entry], capture_output=True, text=True,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=900)
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-3000:]
    check_placed_run(runs_dir / "multinode-job", nodes)
