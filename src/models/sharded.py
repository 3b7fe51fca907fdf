"""Models whose parameters are sharded across ranks: DeepSpeed ZeRO-3 and FSDP2.

Under ZeRO-3 every rank holds a slice of each parameter (``param.ds_tensor``; ``param.data`` is empty
until DeepSpeed gathers it for a forward); under FSDP2 each parameter is a ``DTensor`` whose local shard
is ``param.to_local()``. Everything that needs whole parameters outside a training forward goes through
this module:

* :func:`sharding_of` / :func:`sharding_summary`: what a model (or its wrapper) really is — the launcher
  prints it and the tests assert it, so a silent fall-back to DDP cannot pass for sharding;
* :func:`full_shape` and :func:`gathered_for_update`: read or change whole parameters (coord-token rows
  added at load time);
* :func:`prepared_for_generation`: the parameters gathered ONCE for a whole ``generate`` call instead of
  once per layer per token (``custom.extra.rollout_matching.sharded_generation: gather_once``), or what
  generation on the sharded model needs (``per_token``);
* (the module-by-module export of full weights for a rollout engine that holds its own copy, e.g. vLLM,
  is :func:`src.rollout.weights.checkpoint_tensors`);
* :func:`alias_tied_parameters`: a gathered state dict saved as a normal model (tied weights once).

Every function that gathers is a collective: all ranks must call it, in the same order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import torch

Sharding = Literal["zero3", "fsdp2"]


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


def is_fsdp2_param(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def inner_module(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without DDP / DeepSpeed wrappers (``.module``); FSDP2 shards in place (no wrapper)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def sharding_of(model: torch.nn.Module) -> Sharding | None:
    """``"zero3"`` / ``"fsdp2"`` when the parameters of ``model`` (or of the module it wraps) are sharded
    across ranks; None for whole parameters (single process, DDP, ZeRO-1/2)."""
    for p in inner_module(model).parameters():
        if is_zero3_param(p):
            return "zero3"
        if is_fsdp2_param(p):
            return "fsdp2"
    return None


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter ``p`` (ZeRO-3 keeps it in ``ds_shape``; a DTensor's ``shape`` is global)."""
    return p.ds_shape if is_zero3_param(p) else p.shape


@dataclass(frozen=True)
class ShardingSummary:
    """What one rank holds. ``local_params`` / ``total_params``: parameter elements on this rank / in the
    model; ``local_optimizer`` / ``total_optimizer``: fp32 optimizer-partition elements under ZeRO-1/2
    (0 / 0 when not measured)."""

    kind: str                 # "zero3", "fsdp2", "zero1" / "zero2" (optimizer states [and gradients] partitioned), "replicated"
    wrapper: str              # class name of the wrapped training model (DeepSpeedEngine, DistributedDataParallel, FSDP...)
    local_params: int
    total_params: int
    local_optimizer: int = 0
    total_optimizer: int = 0

    def line(self) -> str:
        text = f"{self.kind}: {self.wrapper}; this rank holds {self.local_params:,} of {self.total_params:,} parameter elements"
        if self.total_optimizer:
            text += f", {self.local_optimizer:,} of {self.total_optimizer:,} fp32 optimizer-partition elements"
        return text


def sharding_summary(wrapped: torch.nn.Module) -> ShardingSummary:
    """Measured from the parameters themselves (and the DeepSpeed optimizer for ZeRO-1/2), not from the config."""
    module = inner_module(wrapped)
    kind = sharding_of(module)
    local = total = 0
    for p in module.parameters():
        if kind == "zero3":
            local, total = local + p.ds_tensor.numel(), total + p.ds_numel
        elif kind == "fsdp2":
            local, total = local + p.to_local().numel(), total + p.numel()
        else:
            local, total = local + p.numel(), total + p.numel()
    opt_local = opt_total = 0
    partitions = getattr(getattr(wrapped, "optimizer", None), "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if kind is None and partitions:
        opt_local = sum(t.numel() for t in partitions)
        opt_total = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if opt_local < opt_total:
            kind = f"zero{wrapped.zero_optimization_stage()}"
    return ShardingSummary(kind or "replicated", type(wrapped).__name__, local, total, opt_local, opt_total)


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Whole ZeRO-3 ``params`` inside the block (``GatheredParameters``): read only when ``modifier_rank``
    is None, else that rank's changes are broadcast on exit. A no-op for whole parameters."""
    partitioned = [p for p in params if is_zero3_param(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def gathered_for_update(params: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Whole parameters inside the block; under ZeRO-3 rank 0's changes are broadcast on exit. FSDP2
    shards after loading, so loading-time updates never see DTensors."""
    return gathered(params, modifier_rank=0)


@contextlib.contextmanager
def prepared_for_generation(wrapped: torch.nn.Module, gather_once: bool) -> Iterator[None]:
    """What ``generate`` on the unwrapped model of ``wrapped`` needs for the block (every rank enters it).

    ``gather_once=True``: every parameter gathered once for the whole block, so that ``generate`` needs no
    collective per token and ranks may generate different lengths (``synced_gpus=False``); peak memory:
    the whole model on every rank during the block (plus the KV cache).

    * ZeRO-3 (``wrapped``: the DeepSpeedEngine the Trainer prepared): DeepSpeed's own
      ``unwrap_model_for_generation`` - all parameters gathered, the engine's per-module fetch/release
      hooks removed for the block and registered again afterwards.
    * FSDP2: every FSDP module unsharded (one all-gather per module), resharding after forward switched
      off for the block; resharded and switched back on exit.

    ``gather_once=False`` (generation on the sharded model with ``synced_gpus``): ZeRO-3 needs nothing
    (its hooks gather each module for each forward). FSDP2 gets its root module's own parameters
    unsharded for the block: transformers (5.24) encodes the images BEFORE the prefill by calling the
    vision tower directly, outside the root module's forward, where FSDP2 would not gather them
    ("got mixed torch.Tensor and DTensor"). Every wrapped block is still gathered per forward.

    Whole parameters: nothing to do."""
    kind = sharding_of(wrapped)
    if kind == "zero3" and gather_once:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        if getattr(wrapped, "optimizer", None) is None:
            raise RuntimeError("gathering ZeRO-3 parameters for generation needs the DeepSpeed engine the Trainer "
                               f"prepared (with its optimizer); got {type(wrapped).__name__}")
        with unwrap_model_for_generation(wrapped):
            yield
    elif kind == "fsdp2":
        with _fsdp2_unsharded(inner_module(wrapped), everything=gather_once):
            yield
    else:
        yield


@contextlib.contextmanager
def _fsdp2_unsharded(model: torch.nn.Module, everything: bool) -> Iterator[None]:
    """The FSDP2 root module's parameters (and with ``everything`` every FSDP module's) unsharded and
    kept so across forwards until exit."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules or modules[0] is not model:
        raise RuntimeError(f"FSDP2 generation expects the root module to be sharded; got {type(model).__name__}")
    # FSDP2 decides which module is the root at the first forward that reaches one of its modules. The
    # image encoding transformers runs before the prefill reaches a vision block first; decide it here.
    model._get_fsdp_state()._lazy_init()
    targets = modules if everything else modules[:1]
    # reshard-after-forward lives per parameter group (post_forward_mesh_info None = keep unsharded);
    # remember each group's setting to restore it exactly.
    groups = [g for m in targets for g in m._get_fsdp_state()._fsdp_param_groups]
    saved = [g.post_forward_mesh_info for g in groups]
    for m in targets:
        m.unshard()
    for g in groups:
        g.post_forward_mesh_info = None
    try:
        yield
    finally:
        for g, info in zip(groups, saved):
            g.post_forward_mesh_info = info
        for m in targets:
            m.reshard()


@contextlib.contextmanager
def loading_whole_models(hf_deepspeed_config) -> Iterator[None]:
    """``from_pretrained`` inside the block loads whole parameters although the run uses ZeRO-3: transformers
    partitions every model it loads while a ZeRO-3 config is registered (``deepspeed.zero.Init``, a
    collective no other rank joins when one rank loads alone). ``hf_deepspeed_config``: the run's
    ``TrainingArguments.hf_deepspeed_config`` (None: nothing to do), registered again on exit."""
    if hf_deepspeed_config is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_deepspeed_config)


def alias_tied_parameters(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` with the names of each parameter of ``model`` that is tied (one Parameter under
    several names: Qwen-VL's input embeddings and ``lm_head`` with ``tie_word_embeddings``) pointing at
    ONE tensor again.

    A whole state dict assembled from ZeRO-1/2 or FSDP2 holds a separate copy per name, while
    ``save_pretrained`` finds ties by shared storage: the saved model then carried a second copy of the
    embeddings under ``lm_head.weight``. Names absent from ``state_dict`` are left alone."""
    names_of: dict[int, list[str]] = {}
    for name, p in inner_module(model).named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    out = dict(state_dict)
    for names in names_of.values():
        present = [n for n in names if n in out]
        for name in present[1:]:
            out[name] = out[present[0]]
    return out


