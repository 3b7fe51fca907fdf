"""The training model's weights as checkpoint tensors, one module at a time (for the weight push to vLLM).

:func:`checkpoint_tensors` yields ``(name, tensor)`` pairs named as in a saved checkpoint of the plain
transformers model (``model.language_model.layers.0.self_attn.q_proj.weight``, ...), whatever wraps the
training model:

* DDP / DeepSpeed / accelerate wrappers: unwrapped (``.module``);
* peft LoRA: each adapted linear layer is yielded MERGED (base weight + the active adapters' deltas) as a
  fresh tensor; the training weights are never touched (no merge / unmerge round trip, which would not
  restore bf16 weights bit for bit). Trainable token rows (``trainable_token_indices``, the coord rows)
  are merged the same way;
* DeepSpeed ZeRO-3: the parameters of ONE module are gathered at a time (``GatheredParameters``), copied
  and released before the next module, so the whole model is never gathered at once;
* FSDP2 ``DTensor`` parameters: ``full_tensor()`` per parameter (a collective every rank runs in the
  same order).

Tied parameters are yielded once (the first name). Buffers are not yielded (rotary tables are derived).
Every rank must iterate the whole generator when parameters are partitioned (the gathers are collectives).
"""

from __future__ import annotations

from typing import Iterator

import torch

from src.models.sharded import gathered, inner_module, is_fsdp2_param, is_zero3_param


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / DeepSpeed / peft wrappers."""
    model = inner_module(model)
    if hasattr(model, "get_base_model"):  # peft: the transformers model with the adapter layers injected
        model = model.get_base_model()
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """A complete, detached tensor: FSDP2 DTensors are gathered; ZeRO-3 data (valid only while gathered)
    is copied, so the caller may keep it after the module is released; anything else is shared as is
    (the engine copies it into its own weights)."""
    if is_fsdp2_param(t):
        return t.full_tensor().detach()
    return t.detach().clone() if is_zero3_param(t) else t.detach()


def _lora_merged(layer) -> torch.Tensor:
    """``base weight + sum of the active adapters' deltas`` of a peft LoRA layer (a new tensor)."""
    weight = layer.get_base_layer().weight
    merged = _full(weight)
    for name in layer.active_adapters:
        if name not in layer.lora_A or name in getattr(layer, "merged_adapters", ()):
            continue
        if layer.use_dora.get(name, False):
            raise NotImplementedError("model.lora: DoRA adapters cannot be merged for the vLLM weight push")
        merged = merged + layer.get_delta_weight(name).to(merged.dtype)  # never in place: merged may share the training weight
    return merged


def checkpoint_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` for every parameter of ``model``'s transformers model, module by
    module (see the module docstring). Tensors are complete and detached; LoRA layers merged."""
    base = unwrap(model)
    lora_layer = trainable_tokens_layer = ()
    if any(type(m).__module__.startswith("peft.") for m in base.modules()):
        from peft.tuners.lora import LoraLayer
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        lora_layer, trainable_tokens_layer = (LoraLayer,), (TrainableTokensLayer,)
    seen: set[int] = set()

    def walk(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if hasattr(module, "token_adapter") and isinstance(module.token_adapter, trainable_tokens_layer):
            module = module.token_adapter  # peft's wrapper around an embedding with trainable rows: same name
        if isinstance(module, lora_layer + trainable_tokens_layer):
            base_layer = module.get_base_layer()
            if id(base_layer.weight) in seen:  # e.g. an lm_head tied to the embedding
                return
            seen.add(id(base_layer.weight))
            with gathered(list(module.parameters())):
                if isinstance(module, lora_layer):
                    yield f"{prefix}weight", _lora_merged(module)
                else:
                    yield f"{prefix}weight", _full(module.get_merged_weights(module.active_adapters))
                if getattr(base_layer, "bias", None) is not None:
                    yield f"{prefix}bias", _full(base_layer.bias)
            return
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if own:
            with gathered([p for _, p in own]):
                for n, p in own:
                    seen.add(id(p))
                    yield f"{prefix}{n}", _full(p)
        for n, child in module.named_children():
            yield from walk(child, f"{prefix}{n}.")

    yield from walk(base, "")
