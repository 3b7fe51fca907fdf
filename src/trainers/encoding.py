"""Per-sample prompt encoding and the padded batches built from it.

One :class:`PromptEncoding` per sample is made once (the processor expands the image placeholder) and
reused for the rollout (LEFT-padded generate batch) and for the teacher-forced forward (RIGHT-padded
``prompt + assistant`` batch). Both batches therefore carry exactly the same prompt ids, image tensors
and ``mm_token_type_ids`` (which Qwen-VL needs for correct rope positions; FIELD_NOTES).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from src.data.prompt import prompt_text


@dataclass(frozen=True)
class PromptEncoding:
    """One sample's prompt. ``input_ids``/``mm_token_type_ids``: ``[L]`` (no padding);
    ``pixel_values``: ``[n_patches, D]``; ``image_grid_thw``: ``[1, 3]``."""

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def digest(self) -> str:
        """Hash of the prompt ids (used to check that the forward uses the rollout's exact prompt)."""
        return hashlib.sha1(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()


def encode_prompt(processor, image, prompt: str | None = None) -> PromptEncoding:
    """Encode one image + the shared prompt (``src.data.prompt``) with the model's processor.

    The prompt must hold exactly one image placeholder; the processor must expand it to the image's
    token count (``grid_thw.prod() // merge_size**2``), marked 1 in ``mm_token_type_ids``."""
    from src.models.processor import num_image_tokens

    prompt = prompt if prompt is not None else prompt_text(processor)
    if (n := prompt.count(processor.image_token)) != 1:
        raise ValueError(f"the prompt has {n} {processor.image_token} placeholders, expected exactly 1")
    enc = processor(images=[image], text=[prompt], return_tensors="pt", return_mm_token_type_ids=True)
    ids = enc["input_ids"][0]
    mm = enc.get("mm_token_type_ids")
    mm = mm[0] if mm is not None else torch.zeros_like(ids)
    expected = int(num_image_tokens(processor, enc["image_grid_thw"])[0])
    found = int((ids == processor.image_token_id).sum())
    if found != expected or int(mm.sum()) != expected:
        raise RuntimeError(f"image placeholder expanded to {found} tokens ({int(mm.sum())} marked), expected {expected}")
    return PromptEncoding(
        input_ids=ids.to(torch.long), mm_token_type_ids=mm.to(torch.long),
        pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
    )


def image_digests(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[str]:
    """sha1 of each image's rows of a batch's concatenated ``pixel_values`` (``[sum_i t*h*w, D]``; image i
    owns ``prod(image_grid_thw[i])`` rows, in order)."""
    rows = image_grid_thw.prod(dim=-1).tolist()
    out, start = [], 0
    for n in rows:
        block = pixel_values[start : start + n].detach().cpu().contiguous()
        out.append(hashlib.sha1(block.view(torch.uint8).numpy().tobytes()).hexdigest())
        start += n
    if start != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw accounts for {start} pixel rows, pixel_values has {pixel_values.shape[0]}")
    return out


def stack_images(prompts: Sequence[PromptEncoding]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.cat([p.pixel_values for p in prompts], dim=0),
        "image_grid_thw": torch.cat([p.image_grid_thw for p in prompts], dim=0),
    }


def left_padded_prompts(prompts: Sequence[PromptEncoding], pad_id: int) -> dict[str, torch.Tensor]:
    """Generation batch: prompts LEFT-padded to the longest; ``[B, L]`` tensors + image tensors."""
    L = max(p.input_ids.numel() for p in prompts)
    B = len(prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        n = p.input_ids.numel()
        ids[b, L - n :] = p.input_ids
        mask[b, L - n :] = 1
        mm[b, L - n :] = p.mm_token_type_ids
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm, **stack_images(prompts)}


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
