"""Per-sample prompt encoding, shared by the rollout engines, the trainers and the tools.

One :class:`PromptEncoding` per sample is made once (the processor expands the image placeholder) and
reused for the rollout (LEFT-padded generate batch, :func:`left_padded_prompts`) and for the
teacher-forced forward (RIGHT-padded ``prompt + assistant`` batch, :mod:`src.trainers.batches`). Both
therefore carry exactly the same prompt ids, image tensors and ``mm_token_type_ids`` (which Qwen-VL
needs for correct rope positions: without it Qwen2.5-VL silently uses wrong positions in a
left-padded batch).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from src.data.prompt import prompt_text


@dataclass(frozen=True)
class PromptEncoding:
    """One sample's prompt. ``input_ids``/``mm_token_type_ids``: ``[L]`` (no padding);
    ``pixel_values``: ``[n_patches, D]``; ``image_grid_thw``: ``[1, 3]``; ``image``: the PIL image they were
    made from (engines that run their own image processing, like vLLM, take it)."""

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    image: Any = field(default=None, compare=False, repr=False)

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
        pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"], image=image,
    )


def pixel_digest(rows: torch.Tensor) -> str:
    """sha1 of one image's ``pixel_values`` rows (their exact bytes: dtype and values)."""
    return hashlib.sha1(rows.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


NO_IMAGE_DIGEST = hashlib.sha1(b"").hexdigest()  # what a prompt without an image reports


def image_digests(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[str]:
    """:func:`pixel_digest` of each image's rows of a batch's concatenated ``pixel_values``
    (``[sum_i t*h*w, D]``; image i owns ``prod(image_grid_thw[i])`` rows, in order)."""
    rows = image_grid_thw.prod(dim=-1).tolist()
    out, start = [], 0
    for n in rows:
        out.append(pixel_digest(pixel_values[start : start + n]))
        start += n
    if start != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw accounts for {start} pixel rows, pixel_values has {pixel_values.shape[0]}")
    return out


def prompt_digests(prompts: Sequence[PromptEncoding], pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[str]:
    """One digest per prompt of a batch whose image tensors stack the prompts' images in order: its
    image's :func:`pixel_digest`, or :data:`NO_IMAGE_DIGEST` for a prompt without an image."""
    images = iter(image_digests(pixel_values, image_grid_thw))
    return [next(images) if p.image_grid_thw.numel() else NO_IMAGE_DIGEST for p in prompts]


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


def encode_prompts(processor, images: Sequence, prompt: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """Encode one image per sample with its prompt into a LEFT-padded batch (:func:`encode_prompt` per
    sample + :func:`left_padded_prompts`).

    ``prompt`` is one rendered chat prompt (``src.data.prompt.prompt_text``) shared by all samples, or
    one per sample; each must hold exactly one image placeholder, which the processor expands to the
    image's token count.

    Returns (B samples, L = longest prompt, P = total patches):
        input_ids, attention_mask, mm_token_type_ids: ``[B, L]`` int64, left-padded (pad positions have
            attention 0 and mm type 0; image tokens have mm type 1);
        pixel_values: ``[P, C*T*patch*patch]`` float32, images concatenated;
        image_grid_thw: ``[B, 3]`` int64 (t, h, w in patches).
    """
    images = list(images)
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if not images or len(prompts) != len(images):
        raise ValueError(f"need one prompt per image and at least one image: {len(prompts)} prompts, {len(images)} images")
    encoded = [encode_prompt(processor, image, text) for image, text in zip(images, prompts)]
    return left_padded_prompts(encoded, processor.tokenizer.pad_token_id)
