"""Config section owned by rewards/. Imports only pydantic: cheap to import."""
from __future__ import annotations

from pydantic import Field, field_validator

from rollout.config import Section


class RewardConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Reward-worker actors; groups are spread over them."""
    verifiers: dict[str, float] = {"accuracy": 1.0, "format": 0.2}
    """Verifier name -> weight. The total reward is the weighted sum; each verifier's
    own score is logged as rewards/<name>."""

    @field_validator("verifiers")
    @classmethod
    def _known(cls, value: dict[str, float]) -> dict[str, float]:
        from rewards.verifiers import VERIFIERS

        unknown = sorted(set(value) - set(VERIFIERS))
        if unknown:
            raise ValueError(f"unknown verifier(s) {unknown}; registered: {sorted(VERIFIERS)}")
        if not value:
            raise ValueError("at least one verifier is needed")
        return value
