"""Where each step's metrics go besides metrics.jsonl (always written): TensorBoard
(every metric as a scalar, a few samples per step as text) and Weights & Biases (only
when the `wandb` package is installed; it honours WANDB_MODE=offline, WANDB_PROJECT,
WANDB_DIR and its other usual variables)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cluster.config import ConfigError


def check_available(names: list[str]) -> None:
    """A logger whose package is missing fails before anything starts."""
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("run.loggers: `wandb` needs the wandb package (pip install 'grpo-cluster[wandb]')") from None
    if "tensorboard" in names:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError("run.loggers: `tensorboard` needs the tensorboard package") from None


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and k != "step"}


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """A few samples of a step as a markdown table (TensorBoard's text panel renders it)."""
    lines = ["| prompt | completion | reward | advantage |", "|---|---|---|---|"]
    for s in samples:
        text = s["text"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s['prompt']} | `{text}` | {s['reward']:.3f} | {s['advantage']:+.3f} |")
    return "\n".join(lines)


class Loggers:
    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any]) -> None:
        self.tb = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in names:
            import wandb

            self.wandb = wandb.init(project=None, dir=str(run_dir), name=run_dir.name, config=config, resume="allow",
                                    id=run_dir.name.replace("/", "-"))

    def log(self, row: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        step, values = int(row["step"]), _numbers(row)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
            if samples:
                self.tb.add_text("samples", samples_markdown(samples), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            # finish() can return before wandb's service has written the run's transaction log
            # (seen in CI: a 7-byte .wandb); stopping the service flushes and closes it.
            wandb.teardown()
            self.wandb = None
