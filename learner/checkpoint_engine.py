"""DeepSpeed checkpoints loaded without unpickling code.

DeepSpeed's torch checkpoint engine loads with `torch.load(weights_only=False)`: a
checkpoint from elsewhere could run anything on load. `SafeCheckpointEngine` replaces
it on the learner's engine: the same files, written the same way, but read with
`weights_only=True` and an allow-list of the few plain types DeepSpeed puts in them.
A file holding anything else is refused, naming the file and the type. Only with
`trust=True` (`grpo train --resume ... --trust-checkpoint`, for checkpoints of older
versions that hold other types) does it load as DeepSpeed would.
"""
from __future__ import annotations

import pickle
import re
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that would need unpickling arbitrary objects to load."""


def allowed_globals() -> list[Any]:
    """Types DeepSpeed's own checkpoints of our learner hold (ZeRO 0-3, fp32 and bf16)."""
    import collections

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [collections.OrderedDict, ZeroStageEnum, LossScaler, torch.Size, fragment_address]


class SafeCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, config_params: Any = None, trust: bool = False) -> None:
        super().__init__(config_params)
        self.trust = trust

    def load(self, path: str, map_location: Any = None) -> Any:
        if self.trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        try:
            with torch.serialization.safe_globals(allowed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError) as e:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = f"it holds {found.group(1)}" if found else f"{type(e).__name__}: {str(e)[:200]}"
            raise UnsafeCheckpoint(
                f"{path}: refused to load: it needs more than plain tensors and containers ({what}). "
                "If it is your own checkpoint from an older version, resume with --trust-checkpoint "
                "(that unpickles it: only for files you made yourself)") from None
