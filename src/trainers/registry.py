"""Trainer variants by name (``custom.trainer_variant``)."""

from __future__ import annotations

from src.trainers.rollout_matching import RolloutMatchingSFTTrainer
from src.trainers.sft import SFTTrainer

TRAINER_VARIANTS: dict[str, type] = {"sft": SFTTrainer, "rollout_matching_sft": RolloutMatchingSFTTrainer}


def get_trainer_class(name: str) -> type:
    if name not in TRAINER_VARIANTS:
        raise KeyError(f"custom.trainer_variant: {name!r} is not available (registered: {sorted(TRAINER_VARIANTS)})")
    return TRAINER_VARIANTS[name]
