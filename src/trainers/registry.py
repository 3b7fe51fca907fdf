"""Trainer variants by name (``custom.trainer_variant``)."""

from __future__ import annotations

from typing import Callable

TRAINER_VARIANTS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in TRAINER_VARIANTS:
            raise ValueError(f"trainer variant {name!r} registered twice")
        TRAINER_VARIANTS[name] = cls
        return cls

    return deco


def get_trainer_class(name: str) -> type:
    import src.trainers.sft  # noqa: F401 - registers "sft"

    try:
        import src.trainers.rollout_matching  # noqa: F401 - registers "rollout_matching_sft"
    except ModuleNotFoundError as e:
        if e.name != "src.trainers.rollout_matching":
            raise
    if name not in TRAINER_VARIANTS:
        raise KeyError(f"custom.trainer_variant: {name!r} is not available (registered: {sorted(TRAINER_VARIANTS)})")
    return TRAINER_VARIANTS[name]
