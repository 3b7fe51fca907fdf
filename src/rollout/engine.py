"""The rollout engine interface (SPEC §11): prompts in, rollouts out.

An engine turns :class:`src.rollout.encoding.PromptEncoding` s into :class:`Rollout` s with the decoding of
:class:`DecodeSettings`; the trainers and ``src.infer`` only talk to this interface and get an engine
from :func:`src.rollout.backends.build_engine` (``custom.extra.rollout_matching.backend``). Every engine reports, per rollout,
the prompt ids and image pixels it consumed, which the trainer checks against its teacher-forced forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from src.rollout.encoding import PromptEncoding


@dataclass(frozen=True)
class DecodeSettings:
    decode_mode: str = "greedy"
    max_new_tokens: int = 1024
    num_beams: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    decode_batch_size: int = 8

    @classmethod
    def from_config(cls, rm) -> "DecodeSettings":
        """From a :class:`src.config.schema.RolloutMatchingConfig`."""
        return cls(**{k: getattr(rm, k) for k in cls.__dataclass_fields__})


@dataclass
class Rollout:
    """One generated answer. ``response_ids`` start right after the prompt and end at (and include)
    the first ``<|im_end|>`` when there is one; padding is removed."""

    prompt: PromptEncoding
    response_ids: list[int]
    hit_max_new_tokens: bool
    stopped_by_guard: bool = False
    # What the engine actually consumed for this row (checked against the teacher-forced forward):
    consumed_prompt_ids: tuple[int, ...] = ()   # the prompt ids, padding removed
    consumed_image_digest: str = ""             # sha1 of the pixel rows passed to the engine


class RolloutEngine(Protocol):
    settings: DecodeSettings
    holds_own_weights: bool  # True: generation reads the engine's own copy (vLLM), pushed after mark_stale()
    last_stats: dict[str, float]  # the last generate call: seconds, new_tokens (+ weight_push_s, weight_pushes)

    def generate(self, model, prompts: Sequence[PromptEncoding], synced_gpus: bool = False) -> list[Rollout]:
        """One rollout per prompt, in order. ``model``: the policy to roll out (the unwrapped training
        model; an engine that holds its own copy of the weights uses it only to sync them)."""
        ...

    def mark_stale(self) -> None:
        """The policy's weights changed (an optimizer step, a resumed checkpoint)."""
        ...

    def close(self) -> None:
        """Release the engine (before the training process group is destroyed)."""
        ...


def finish_response(ids: Sequence[int], eos_id: int, pad_id: int, max_new_tokens: int, guard=None) -> tuple[list[int], bool, bool]:
    """``(response_ids, hit_max_new_tokens, stopped_by_guard)`` from an engine's output ids, the same for
    every engine: cut at the first ``<|im_end|>`` (kept: the parser's hard stop) or ``<|endoftext|>``
    (dropped: the model's own end token, or the padding after a row that stopped early). ``guard``: a fresh
    :class:`src.rollout_matching.repeat_guard.RowGuard` fed token by token, for an engine that replays it
    (vLLM), stops the row right after the token that trips it (dropping the ``<|im_end|>`` the engine was
    made to emit there); the HF engine stops such rows itself and passes none."""
    for k, t in enumerate(ids):
        if t == eos_id:
            return list(ids[: k + 1]), False, False
        if t == pad_id:
            return list(ids[:k]), False, False
        if guard is not None and guard.push(t):
            return list(ids[: k + 1]), k + 1 >= max_new_tokens, True
    return list(ids), len(ids) >= max_new_tokens, False
