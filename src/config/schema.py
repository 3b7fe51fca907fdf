"""Every configuration key, its type, default and meaning — the ONE place defaults live.

A YAML file has three sections: ``model``, ``training`` and ``custom`` (plus ``extends:``). The
``training`` section holds ``transformers.TrainingArguments`` fields (checked by name and basic type)
plus our own ``packing``, ``effective_batch_size`` and ``overwrite_output_dir``; see :class:`TrainingConfig`.

Each field's ``metadata["help"]`` is its documentation (``docs/config.md`` is generated from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Mapping


META_FIELDS = ("sources", "overrides")  # where a Config came from, not settings


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (used for validation messages and the config reference)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple / MappingProxyType or default_factory for mutable defaults")
    return field(default=default, metadata={"help": help, **kw})


def sub(cls: type, help: str) -> Any:
    """A nested section with its own defaults."""
    return field(default_factory=cls, metadata={"help": help})


# ----------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TinyModelConfig:
    arch: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = opt("qwen3_vl", "Tiny model family to build.")
    preset: Literal["test", "demo"] = opt("demo", "'test' = smallest (unit tests); 'demo' = the recipe that learns positions best on CPU.")
    seed: int = opt(0, "Seed of the random initialisation (same seed -> identical weights).")


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = opt(False, "Train LoRA adapters (needs the 'peft' package) instead of all weights.")
    r: int = opt(16, "LoRA rank.")
    alpha: int = opt(32, "LoRA alpha.")
    dropout: float = opt(0.05, "LoRA dropout.")
    target_modules: tuple[str, ...] | None = opt(None, "Module-name suffixes that get adapters; null = every attention and MLP linear layer of the language model (never the vision tower).")
    train_coord_rows: bool = opt(True, "Also train the 1000 coord-token embedding rows (needed when the coord tokens were just added).")


@dataclass(frozen=True)
class ModelConfig:
    model_name_or_path: str | None = opt(None, "A local model directory: a real Qwen2/2.5/3-VL checkpoint, a tiny model from build_tiny, or a previous run's output_dir. Relative paths resolve against the current directory.")
    build_tiny: TinyModelConfig | None = opt(None, "If set and model_name_or_path does not exist yet, build a tiny random Qwen-VL model there first (offline demo / tests).")
    add_coord_tokens: bool = opt(True, "Add <|coord_0|>..<|coord_999|> to a tokenizer that lacks them (embeddings resized, new rows initialised per custom.coord_tokens.init). False: a model without coord tokens is an error.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Weights dtype at load ('auto' = as saved). Use bfloat16 on GPUs together with training.bf16: true.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = opt(None, "Attention kernel (None = transformers' default).")
    freeze_vision: bool = opt(False, "Freeze the vision tower (patch merger included).")
    min_pixels: int | None = opt(None, "Override the image processor's min_pixels.")
    max_pixels: int | None = opt(None, "Override the image processor's max_pixels (caps image tokens per image).")
    lora: LoraConfig = sub(LoraConfig, "LoRA adapters (optional).")


# ---------------------------------------------------------------------------------------- custom


@dataclass(frozen=True)
class ShapesDataConfig:
    num_train: int = opt(2000, "Training images to generate.")
    num_val: int = opt(64, "Validation images to generate.")
    seed: int = opt(0, "Data seed.")
    image_size: int = opt(128, "Square image side in pixels.")
    min_shapes: int = opt(1, "Minimum shapes per image.")
    max_shapes: int = opt(3, "Maximum shapes per image.")
    kinds: tuple[str, ...] = opt(("rectangle",), "Shape kinds: rectangle (bbox_2d), triangle, pentagon, ellipse (poly).")


@dataclass(frozen=True)
class CoordTokensConfig:
    init: Literal["mean", "random"] = opt("mean", "Init of coord-token embedding rows when they are added: 'mean' = mean of the existing rows + Gaussian noise at 1% of their per-dimension std (seed 0); 'random' = N(0, initializer_range).")


@dataclass(frozen=True)
class CoordLossConfig:
    """SPEC §10: L = soft_ce_weight*softCE(q, softmax(z/T)) + w1_weight*W1 + gate_weight*gate at every coord position."""

    soft_ce_weight: float = opt(1.0, "Weight of the soft cross-entropy against the Gaussian target over bins.")
    w1_weight: float = opt(1.0, "Weight of the 1-D Wasserstein distance between predicted and target bin distributions (in units of 1/1000).")
    gate_weight: float = opt(1.0, "Weight of the gate term -log(mass of the coord ids under the full-vocab softmax).")
    target_sigma: float = opt(2.0, "Std of the Gaussian target around the target bin, in bins.")
    target_truncate: int | None = opt(None, "Zero the target beyond this many bins from the centre (None = no truncation).")
    temperature: float = opt(1.0, "Temperature T applied to the coord logits before the softmax.")


@dataclass(frozen=True)
class RepeatGuardConfig:
    """SPEC §11: stop a rollout that falls into a degenerate loop (the prefix cut keeps complete objects)."""

    enabled: bool = opt(False, "Stop generation early on degenerate loops (stopping criteria; counted).")
    max_objects: int | None = opt(None, "Stop after this many object entries (None = no limit).")
    max_duplicate_objects: int = opt(2, "Stop when one identical object (same desc and coords) has appeared this many extra times.")
    max_consecutive_duplicates: int = opt(2, "Stop when this many objects in a row each repeat an earlier object (a loop over several objects; one stray duplicate is tolerated).")
    ngram_size: int = opt(64, "Token n-gram length for the loop detector (long enough to span two objects, so clean dense answers with repeated descs never trigger it).")
    ngram_max_repeats: int = opt(4, "Stop when the last n-gram has occurred this many times in the response.")


@dataclass(frozen=True)
class VLLMConfig:
    """backend: vllm — one colocated vllm.LLM per rank, in the training process (docs/architecture.md)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Engine weights dtype; 'auto' = the training model's parameter dtype. Greedy rollouts equal the HF engine's token for token in float32; in bfloat16 they are close, not equal.")
    gpu_memory_utilization: float = opt(0.3, "GPU only: fraction of the GPU's memory the engine may take (its weights + KV cache); the rest stays with training.")
    kv_cache_gb: float | None = opt(None, "KV cache size in GiB; null = 1 GiB on CPU, sized from gpu_memory_utilization on GPUs.")
    tensor_parallel_size: int = opt(1, "GPUs one engine spans (must divide the number of ranks); each group of that many ranks rolls out its prompts together.")
    max_model_len: int | None = opt(None, "Longest prompt + answer (tokens) the engine accepts; null = max_new_tokens + the longest prompt the processor can produce (the prompt with an image at max_pixels).")
    enable_sleep_mode: bool = opt(False, "GPU only: between rollouts the engine's weights go to host memory and its KV cache is freed (more memory for training, slower rollouts). vLLM's CPU backend has no sleep mode.")


@dataclass(frozen=True)
class RolloutMatchingConfig:
    """Stage-2 knobs (SPEC §7-§12)."""

    backend: Literal["hf", "vllm"] = opt("hf", "Rollout engine: 'hf' = batched transformers generate on the training model; 'vllm' = a colocated vLLM engine per rank that gets the weights pushed after every optimizer step (settings: vllm.*; install: README). Same prompts, same decoding, same counters.")
    decode_mode: Literal["greedy", "beam", "sample"] = opt("greedy", "Decoding for rollouts. Beam trains on the best beam only.")
    max_new_tokens: int = opt(1024, "Cap on generated tokens per rollout (dense LVIS outputs can need ~11k).")
    num_beams: int = opt(1, "Beams for decode_mode: beam (>= 2).")
    temperature: float = opt(0.0, "Sampling temperature (0 for greedy/beam; > 0 for sample).")
    top_p: float = opt(1.0, "Nucleus sampling p (sample mode).")
    top_k: int = opt(0, "Top-k sampling (0 = off; sample mode).")
    repetition_penalty: float = opt(1.0, "Repetition penalty (1.0 = off).")
    decode_batch_size: int = opt(8, "Rollouts generated together (left-padded) per generate call; with backend: vllm, the most sequences the engine runs at once (max_num_seqs).")
    sharded_generation: Literal["gather_once", "per_token"] = opt("gather_once", "Rollouts when the parameters are sharded across ranks (DeepSpeed ZeRO-3, FSDP2; no effect otherwise). 'gather_once' = gather every parameter once per engine call and generate without collectives (each rank holds the whole model during generation; ranks finish independently). 'per_token' = generate on the sharded model with synced_gpus: every layer is all-gathered for every token and every rank runs until the longest rollout of all ranks ends (least memory, far slower). See docs/scale.md.")
    rollout_window: Literal["optimizer_step", "micro_batch"] = opt("optimizer_step", "'optimizer_step' = the micro-batches of one optimizer step (gradient accumulation) are rolled out together in one engine call before the first of them trains (the weights are the same for all of them), then each runs its own forward; decode_batch_size may exceed per_device_train_batch_size. 'micro_batch' = each micro-batch is rolled out just before its forward.")
    candidate_top_k: int = opt(5, "GT candidates per prediction (by box IoU, centre distance when all are 0) before maskIoU.")
    maskiou_gate: float = opt(0.3, "Pairs with maskIoU below this are infeasible (counted in rollout/gating_rejections).")
    maskiou_resolution: int = opt(256, "Canvas side R for the raster maskIoU backend.")
    maskiou_backend: Literal["raster", "exact"] = opt("raster", "'raster' = pycocotools RLE on an RxR canvas; 'exact' = shapely polygon IoU (keeps tiny objects matchable).")
    fp_cost: float = opt(0.5, "Cost of leaving a prediction unmatched (pred -> dummy).")
    fn_cost: float = opt(2.0, "Cost of leaving a GT object unmatched (dummy -> GT).")
    ot_cost: Literal["l2", "l1"] = opt("l2", "Point-to-point cost for Sinkhorn OT (bin units).")
    ot_epsilon: float = opt(10.0, "Sinkhorn entropic regularisation (bin units).")
    ot_iters: int = opt(30, "Sinkhorn iterations.")
    supervise_eos: bool = opt(True, "Supervise the closing '}' and <|im_end|> of Y_train with CE.")
    ce_weight: float = opt(1.0, "Weight of loss/ce in the total.")
    coord_weight: float = opt(1.0, "Weight of loss/coord in the total.")
    loss_normalization: Literal["sample", "token"] = opt("sample", "'sample' = each sample's loss is ce_weight * its mean CE + coord_weight * its mean coord loss, averaged over the optimizer step's samples (every sample weighs the same, however long its tail). 'token' = the sum of ce_weight * CE and coord_weight * coord loss over every supervised position of the optimizer step, divided by their number (across gradient accumulation and ranks; needs rollout_window: optimizer_step).")
    log_rollout_samples: int = opt(4, "Rollout samples appended to rollouts.jsonl per logging step (0 = off).")
    repeat_guard: RepeatGuardConfig = sub(RepeatGuardConfig, "Degenerate-loop guard.")
    vllm: VLLMConfig = sub(VLLMConfig, "The vLLM engine (backend: vllm).")


@dataclass(frozen=True)
class ExtraConfig:
    rollout_matching: RolloutMatchingConfig = sub(RolloutMatchingConfig, "Stage-2 (rollout-matching) settings.")


@dataclass(frozen=True)
class CustomConfig:
    trainer_variant: Literal["sft", "rollout_matching_sft"] = opt("sft", "'sft' = stage 1 (teacher forcing on GT); 'rollout_matching_sft' = stage 2.")
    train_jsonl: str | None = opt(None, "Training JSONL (data contract). Relative paths resolve against the current directory.")
    val_jsonl: str | None = opt(None, "Validation JSONL (optional).")
    object_ordering: Literal["sorted", "random"] = opt("sorted", "Order of GT objects in targets: 'sorted' = top-to-bottom then left-to-right; 'random' = shuffled per sample.")
    on_invalid_record: Literal["error", "skip"] = opt("error", "A JSONL line breaking the contract: 'error' stops with file:line; 'skip' skips and counts it.")
    max_train_samples: int | None = opt(None, "Use only the first N training records.")
    max_val_samples: int | None = opt(None, "Use only the first N validation records.")
    shapes_data: ShapesDataConfig | None = opt(None, "If set and train_jsonl does not exist, generate the synthetic shapes dataset into its folder first.")
    coord_tokens: CoordTokensConfig = sub(CoordTokensConfig, "Coord-token vocabulary settings.")
    coord_soft_ce_w1: CoordLossConfig = sub(CoordLossConfig, "Coord loss (softCE + W1 + gate).")
    extra: ExtraConfig = sub(ExtraConfig, "Variant-specific settings.")


# -------------------------------------------------------------------------------------- training

# Our defaults for TrainingArguments fields (everything else: transformers' defaults).
TRAINING_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "output_dir": "output/run",
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "learning_rate": 1e-5,
    "num_train_epochs": 1.0,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "report_to": ["tensorboard"],
    "remove_unused_columns": False,  # our collators need the raw records
    "dataloader_num_workers": 0,
    "seed": 42,
})


@dataclass(frozen=True)
class TrainingConfig:
    packing: bool = opt(False, "Pack several samples into one sequence. Not supported (stage 2 forbids it; stage 1 pads per batch).")
    effective_batch_size: int | None = opt(None, "Samples per optimizer step across all ranks; sets gradient_accumulation_steps = effective / (per_device_train_batch_size * world_size).")
    overwrite_output_dir: bool = opt(False, "Let a fresh run (no resume_from_checkpoint) start in a non-empty output_dir: the previous run's checkpoints, trainer_state.json, summary.json and rollouts.jsonl are deleted first. Without it such a run stops (one directory, one run).")
    args: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType(dict(TRAINING_DEFAULTS)), metadata={"help": "transformers.TrainingArguments fields."})


@dataclass(frozen=True)
class Config:
    model: ModelConfig = sub(ModelConfig, "Model and tokenizer.")
    custom: CustomConfig = sub(CustomConfig, "Data, variant and loss settings.")
    training: TrainingConfig = sub(TrainingConfig, "Trainer settings.")
    sources: tuple[str, ...] = ()  # the YAML files merged, base first
    overrides: tuple[str, ...] = ()  # command-line `section.key=value` overrides applied last, in order

    @property
    def rollout_matching(self) -> RolloutMatchingConfig:
        return self.custom.extra.rollout_matching
