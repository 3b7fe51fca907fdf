"""The teacher-forced batch: prompt + assistant ids with per-token supervision, RIGHT-padded.

The prompt part is the sample's :class:`src.rollout.encoding.PromptEncoding`, the very tensors its
rollout was generated from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from src.rollout.encoding import PromptEncoding, stack_images


@dataclass
class SupervisedSequence:
    """One teacher-forced sample: prompt + assistant ids with per-assistant-token supervision.

    ``ce_targets[i]``: the token id when assistant token i is CE-supervised, else -100.
    ``coord_bins[i]``: the target bin when token i gets the coord loss, else -1.
    ``coord_segment[i]``: 0 = rollout prefix, 1 = tail (stage 1: all tail).
    """

    prompt: PromptEncoding
    assistant_ids: list[int]
    ce_targets: list[int]
    coord_bins: list[int]
    coord_segment: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.assistant_ids)
        if not self.coord_segment:
            self.coord_segment = [1] * n
        if not (len(self.ce_targets) == len(self.coord_bins) == len(self.coord_segment) == n):
            raise ValueError("supervision arrays must have one entry per assistant token")


def right_padded_teacher_forced(samples: Sequence[SupervisedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Teacher-forced batch, RIGHT-padded. Supervision is moved to LOGIT positions: the token at
    absolute position t is predicted by the logits at t-1, so ``supervised_mask[b, t-1]`` is set.

    Returns model inputs (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``,
    ``image_grid_thw``) plus ``supervised_mask`` ``[B, L]`` bool and, each ``[B, L]``,
    ``ce_targets`` (-100), ``coord_bins`` (-1), ``coord_segment``, and ``assistant_start`` ``[B]``.
    """
    lens = [s.prompt.input_ids.numel() + len(s.assistant_ids) for s in samples]
    B, L = len(samples), max(lens)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.long)
    ce = torch.full((B, L), -100, dtype=torch.long)
    cb = torch.full((B, L), -1, dtype=torch.long)
    seg = torch.ones((B, L), dtype=torch.long)
    start = torch.zeros(B, dtype=torch.long)
    for b, s in enumerate(samples):
        p = s.prompt.input_ids.numel()
        n = len(s.assistant_ids)
        if p == 0:
            raise ValueError("empty prompt")
        ids[b, :p] = s.prompt.input_ids
        ids[b, p : p + n] = torch.tensor(s.assistant_ids, dtype=torch.long)
        attn[b, : p + n] = 1
        mm[b, :p] = s.prompt.mm_token_type_ids
        # logits at position t-1 predict the token at t
        ce[b, p - 1 : p - 1 + n] = torch.tensor(s.ce_targets, dtype=torch.long)
        cb[b, p - 1 : p - 1 + n] = torch.tensor(s.coord_bins, dtype=torch.long)
        seg[b, p - 1 : p - 1 + n] = torch.tensor(s.coord_segment, dtype=torch.long)
        start[b] = p
    sup = (ce >= 0) | (cb >= 0)
    return {
        "input_ids": ids, "attention_mask": attn, "mm_token_type_ids": mm, **stack_images([s.prompt for s in samples]),
        "supervised_mask": sup, "ce_targets": ce, "coord_bins": cb, "coord_segment": seg, "assistant_start": start,
    }


MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
