import os
from pathlib import Path

import pytest

# Loopback-only local heads in tests need no token auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
