"""Rollouts from a policy whose parameters are sharded across ranks (DeepSpeed ZeRO-3, FSDP2).

``custom.extra.rollout_matching.sharded_generation`` chooses how (docs/scale.md):

* ``gather_once``: every parameter gathered once for the engine call
  (:func:`src.models.sharded.prepared_for_generation`), then ``generate`` without any collective: each
  rank decodes at its own pace and stops with its own rollouts. Memory: the whole model on every rank
  during the call.
* ``per_token``: ``generate`` on the sharded model with ``synced_gpus``: every layer is all-gathered for
  every token, and every rank keeps stepping (on finished rows) until the longest rollout of all ranks
  ends — without it, ranks with different lengths issue different collectives and the run fails.

Whole parameters (single process, DDP, ZeRO-1/2) need neither. Every rank must call this the same number
of times.
"""

from __future__ import annotations

from typing import Sequence

from src.models.sharded import prepared_for_generation, sharding_of
from src.rollout.encoding import PromptEncoding
from src.rollout.engine import Rollout, RolloutEngine
from src.utils.parallel import world

SHARDED_GENERATION = ("gather_once", "per_token")


def generate_rollouts(engine: RolloutEngine, prompts: Sequence[PromptEncoding], *, model, wrapped,
                      sharded_generation: str = "gather_once") -> list[Rollout]:
    """``engine.generate`` on ``model`` (the unwrapped policy); ``wrapped``: the model as the Trainer
    prepared it (the DeepSpeed engine under ZeRO-3; the model itself under FSDP2)."""
    if sharded_generation not in SHARDED_GENERATION:
        raise ValueError(f"sharded_generation must be one of {SHARDED_GENERATION}, got {sharded_generation!r}")
    if sharding_of(model) is None or engine.holds_own_weights:
        # whole parameters; or an engine with its own copy of the weights (vLLM): its weight push gathers
        # module by module (src.rollout.weights.checkpoint_tensors), generation needs no gather
        return engine.generate(model, prompts, synced_gpus=False)
    gather_once = sharded_generation == "gather_once"
    with prepared_for_generation(wrapped, gather_once=gather_once):
        return engine.generate(model, prompts, synced_gpus=not gather_once and world()[1] > 1)
