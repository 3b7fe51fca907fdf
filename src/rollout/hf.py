"""The Hugging Face engine: batched ``generate`` over left-padded prompts (SPEC §11).

``decode_batch_size`` prompts per ``generate`` call, without grad, KV cache on, on the unwrapped model in
eval mode with gradient checkpointing off — restored in ``finally``. The GenerationConfig is complete and
explicit, and the model's own ``generation_config`` is emptied during the call: nothing is inherited from
the checkpoint's ``generation_config.json`` (since transformers v5, unset fields would be).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Sequence

import torch

from src.rollout.encoding import PromptEncoding, left_padded_prompts, prompt_digests
from src.rollout.engine import DecodeSettings, Rollout, finish_response
from src.rollout.guard import RepeatGuardCriteria


def build_generation_config(s: DecodeSettings, eos_id: int, pad_id: int):
    """A GenerationConfig where every field that shapes the next-token distribution is set.

    transformers fills each field left ``None`` from the checkpoint's ``generation_config.json`` (a
    Qwen3-VL checkpoint would turn sampling into top_k 20 with its own temperature / top_p) or from
    global defaults (top_k 50). Neutral values switch a processor off: ``top_k=0``, ``top_p=1.0``,
    ``typical_p=1.0``, ``epsilon_cutoff=eta_cutoff=0.0``, penalties 1.0. Fields whose only neutral value is
    ``None`` (``min_p``, ``top_h``, ``suppress_tokens``, ``bad_words_ids``, ``sequence_bias``, ...) are kept
    from the checkpoint by :func:`neutral_model_defaults` during generation."""
    from transformers import GenerationConfig

    sample = s.decode_mode == "sample"
    return GenerationConfig(
        max_new_tokens=s.max_new_tokens,
        min_new_tokens=0,  # min_length follows from it (setting both makes transformers warn on every call)
        do_sample=sample,
        num_beams=s.num_beams if s.decode_mode == "beam" else 1,
        num_return_sequences=1,  # beam: the best beam only
        temperature=s.temperature if sample else 1.0,
        top_p=s.top_p if sample else 1.0,
        top_k=s.top_k if sample else None,  # 0 = off; read only when sampling (any value under greedy makes transformers warn)
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=s.repetition_penalty,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        renormalize_logits=False,
        remove_invalid_values=False,
        eos_token_id=[eos_id, pad_id],  # <|im_end|> ends the turn; <|endoftext|> too (as in Qwen's own config)
        pad_token_id=pad_id,
        use_cache=True,
        length_penalty=1.0,
        early_stopping=True if s.decode_mode == "beam" else False,
        output_scores=False,
        return_dict_in_generate=False,
    )


@contextlib.contextmanager
def neutral_model_defaults(model) -> Iterator[None]:
    """Generate with an empty ``model.generation_config``, so that nothing left ``None`` in ours is
    filled from the checkpoint's ``generation_config.json`` (restored on exit)."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@contextlib.contextmanager
def generation_mode(model, gradient_checkpointing_kwargs: dict | None = None) -> Iterator[None]:
    """Eval mode, gradient checkpointing off, no grad — restored on exit even when generate raises."""
    was_training = model.training
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    had_gc = bool(getattr(model, flag, False))
    if had_gc:
        model.gradient_checkpointing_disable()
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if had_gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        model.train(was_training)


class HFEngine:
    """Batched Hugging Face ``generate``, on the training model itself."""

    holds_own_weights = False

    def __init__(self, settings: DecodeSettings, eos_id: int, pad_id: int, *, table=None, guard=None,
                 gradient_checkpointing_kwargs: dict | None = None):
        """``guard``: :class:`src.rollout_matching.repeat_guard.GuardSettings` (needs ``table``) or None."""
        if guard is not None and settings.decode_mode == "beam":
            raise ValueError("the repeat guard tracks rows token by token; beams are reordered every step (use greedy or sample)")
        self.settings = settings
        self.eos_id, self.pad_id = eos_id, pad_id
        self.generation_config = build_generation_config(settings, eos_id, pad_id)
        self.table, self.guard = table, guard
        self.gc_kwargs = gradient_checkpointing_kwargs
        self.last_stats: dict[str, float] = {}

    def mark_stale(self) -> None:
        """Nothing to do: every rollout reads the training model's current weights."""

    def close(self) -> None:
        """Nothing to release."""

    def generate(self, model, prompts: Sequence[PromptEncoding], synced_gpus: bool = False) -> list[Rollout]:
        out: list[Rollout] = []
        device = next(model.parameters()).device
        t0 = time.perf_counter()
        with generation_mode(model, self.gc_kwargs):
            bs = self.settings.decode_batch_size
            for i in range(0, len(prompts), bs):
                chunk = prompts[i : i + bs]
                batch = left_padded_prompts(chunk, self.pad_id)
                digests = prompt_digests(chunk, batch["pixel_values"], batch["image_grid_thw"])
                if batch["image_grid_thw"].numel() == 0:  # text-only prompts
                    del batch["pixel_values"], batch["image_grid_thw"]
                batch = {k: v.to(device) for k, v in batch.items()}
                if "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
                L = batch["input_ids"].shape[1]
                guard = RepeatGuardCriteria(self.table, self.guard, L, (self.eos_id, self.pad_id)) if self.guard else None
                kwargs = {"stopping_criteria": [guard]} if guard else {}
                with neutral_model_defaults(model):
                    seqs = model.generate(**batch, generation_config=self.generation_config, synced_gpus=synced_gpus, **kwargs)
                guard_hits = guard.stopped_rows if guard else set()
                for b, p in enumerate(chunk):
                    resp, hit_cap, _ = finish_response(seqs[b, L:].tolist(), self.eos_id, self.pad_id, self.settings.max_new_tokens)
                    consumed = tuple(seqs[b, L - p.input_ids.numel() : L].tolist())  # the generated sequence's own prompt part
                    out.append(Rollout(prompt=p, response_ids=resp, hit_max_new_tokens=hit_cap, stopped_by_guard=b in guard_hits,
                                       consumed_prompt_ids=consumed, consumed_image_digest=digests[b]))
        self.last_stats = {"seconds": time.perf_counter() - t0, "new_tokens": float(sum(len(r.response_ids) for r in out))}
        return out
