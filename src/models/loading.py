"""Load a Qwen2/2.5/3-VL model directory (ours from ``build_tiny``, a run, a LoRA adapter checkpoint or a
real checkpoint) for training or inference.

``load_model_and_processor`` is the one entry point: family detection (from config.json ``model_type``,
a LoRA adapter's from its base model), the image-only processor with left padding, coord tokens (added
and their embedding rows initialised when asked), dtype, attention implementation, LoRA adapter
checkpoints (base + adapter, merged), a frozen vision tower and new LoRA adapters. Every failure that a config can cause raises
``ModelLoadError`` with one line naming the directory or the config key.

Coord-token rows, when this function adds the tokens (``model.add_coord_tokens: true``):
    * the embedding matrix grows to ``len(tokenizer)`` only if it is too small; real checkpoints
      carry spare rows (151,936 for 151,669 tokens) and are never shrunk;
    * every coord row is (re)initialised, in the input embeddings and, if untied, the output ones:
      ``coord_init="mean"``: mean of the existing token rows (ids below the first added one) plus
      Gaussian noise of 1% of their per-dimension std (so rows differ; logits start near-uniform
      over the coord bins); ``"random"``: N(0, initializer_range). The noise is seeded (0): the same
      checkpoint always gives the same rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from src.models.checkpoints import (
    CheckpointError,
    adapter_base_dir,
    has_tokenizer_files,
    is_adapter_dir,
    merge_adapters,
    training_coord_init,
)
from src.models.processor import detect_family, load_processor
from src.models.sharded import full_shape, gathered_for_update
from src.models.tokenizer import FIRST_COORD_ID, coord_token_ids, coord_tokens
from src.models.tokenizer import add_coord_tokens as _add_coord_tokens  # the name is also a parameter below

logger = logging.getLogger(__name__)

# config.json model_type -> transformers class name.
MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COORD_INITS = ("mean", "random")
COORD_INIT_NOISE = 0.01  # noise std as a fraction of the existing rows' per-dimension std
# Linear layers of the language model only: Qwen2.5-VL's vision MLP also has gate/up/down_proj.
LANGUAGE_LINEAR_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class ModelLoadError(ValueError):
    """A model directory or loading option that cannot work; the message is one line."""


class MissingCoordTokensError(ModelLoadError):
    """The tokenizer lacks the coord tokens and they may not be added (``add_coord_tokens=False``)."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (peft) on the language model.

    target_modules: a peft regex (full match on module names) or a list of module-name suffixes.
    train_coord_rows: also train the 1000 coord-token embedding rows (peft ``trainable_token_indices``;
        with tied embeddings this trains the output rows too). Needed when the coord tokens are new.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = LANGUAGE_LINEAR_REGEX
    train_coord_rows: bool = True

    def __post_init__(self):
        if self.r <= 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ModelLoadError(f"model.lora: need r > 0, alpha > 0, 0 <= dropout < 1; got {self}")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))


def _as_lora_spec(lora) -> LoraSpec | None:
    if lora is None or isinstance(lora, LoraSpec):
        return lora
    if isinstance(lora, dict):
        unknown = set(lora) - set(LoraSpec.__dataclass_fields__)
        if unknown:
            valid = sorted(LoraSpec.__dataclass_fields__)
            raise ModelLoadError(f"model.lora: unknown keys {sorted(unknown)} (valid: {valid})")
        return LoraSpec(**lora)
    raise ModelLoadError(f"model.lora must be a mapping or LoraSpec, got {type(lora).__name__}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def has_coord_tokens(tokenizer) -> bool:
    """True when every <|coord_k|> (k = 0..999) is a token of ``tokenizer``."""
    ids = tokenizer.convert_tokens_to_ids(coord_tokens())
    return all(i is not None and i != tokenizer.unk_token_id for i in ids)


def _row_mean_std(weight: torch.Tensor, n_rows: int, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of ``weight[:n_rows]`` in float32, in chunks (large bf16 tables). ``[D], [D]``."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, n_rows, chunk):
        block = weight[start : min(start + chunk, n_rows)].double()
        total += block.sum(0)
        total_sq += (block * block).sum(0)
    mean = total / n_rows
    std = (total_sq / n_rows - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


@torch.no_grad()
def init_coord_rows(model, coord_ids: list[int], n_existing: int, method: str = "mean", seed: int = 0) -> None:
    """(Re)initialise the embedding rows ``coord_ids`` (input, and output if untied) in place.

    ``mean``: mean of rows ``[0, n_existing)`` + N(0, (COORD_INIT_NOISE * their std)^2) per dimension.
    ``random``: N(0, initializer_range^2).
    """
    if method not in COORD_INITS:
        raise ModelLoadError(f"custom.coord_tokens.init must be one of {COORD_INITS}, got {method!r}")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor(coord_ids)
    weights = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    with gathered_for_update(weights):  # whole rows under ZeRO-3; rank 0's rows are broadcast on exit
        for w in weights:
            noise = torch.randn(len(coord_ids), w.shape[1], generator=generator)  # [1000, D]
            if method == "mean":
                mean, std = _row_mean_std(w, n_existing)
                rows = mean + noise * (COORD_INIT_NOISE * std)
            else:
                rows = noise * model.config.get_text_config().initializer_range
            w[ids.to(w.device)] = rows.to(device=w.device, dtype=w.dtype)


def add_missing_coord_tokens(tokenizer, add: bool, model_dir: Path) -> int | None:
    """Add the coord tokens if the tokenizer lacks them (and ``add``). Returns ``len(tokenizer)`` before
    adding, or None when they were already there."""
    if has_coord_tokens(tokenizer):
        return None
    if not add:
        raise MissingCoordTokensError(
            f"{model_dir}: tokenizer lacks the coord tokens <|coord_0|>..<|coord_999|>; "
            "set model.add_coord_tokens: true to add them"
        )
    n_before = len(tokenizer)
    try:
        _add_coord_tokens(tokenizer)
    except ValueError as e:  # a partial set of coord tokens
        raise ModelLoadError(f"{model_dir}: {e}") from e
    return n_before


def fit_coord_rows(model, tokenizer, n_before: int | None, coord_init: str, model_dir: Path) -> None:
    """Give every token an embedding row; (re)initialise the coord rows if the tokens were just added.

    Grows the embeddings to ``len(tokenizer)`` only when they are too small (never shrinks).
    """
    n_rows = full_shape(model.get_input_embeddings().weight)[0]  # ZeRO-3 partitions the weight at load
    if n_before is None:
        if len(tokenizer) > n_rows:
            raise ModelLoadError(
                f"{model_dir}: tokenizer has {len(tokenizer)} tokens but the model only {n_rows} embedding rows"
            )
        return
    if len(tokenizer) > n_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = coord_token_ids(tokenizer)
    init_coord_rows(model, ids, n_existing=n_before, method=coord_init)
    logger.info("added coord tokens (ids %d..%d) to the tokenizer of %s; rows initialised with %r%s",
                ids[0], ids[-1], model_dir, coord_init,
                "" if ids[0] == FIRST_COORD_ID else f" (ids differ from the offline tokenizer's {FIRST_COORD_ID}+k)")


def keep_used_weight_conversions(model) -> None:
    """Remember only the checkpoint-key conversions that loading applied, so that saving writes the
    checkpoint's own key names back.

    ``from_pretrained`` keeps, in ``model._weight_conversions``, the key renamings that matched the
    checkpoint, and ``save_pretrained`` reverts them. Under DeepSpeed ZeRO-3 transformers (seen in 5.24)
    keeps EVERY known renaming instead, used or not: the saved model then had keys such as
    ``model.language_model.model.layers.*`` instead of ``model.language_model.layers.*``. A no-op for a
    normal load (already only the used ones) and for versions without the attribute."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions and all(hasattr(c, "was_used") for c in conversions):
        model._weight_conversions = [c for c in conversions if c.was_used()]


def _check_vision_token_ids(model, tokenizer, model_dir: Path) -> None:
    for key, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                       ("vision_end_token_id", "<|vision_end|>")):
        want, have = getattr(model.config, key, None), tokenizer.convert_tokens_to_ids(token)
        if want != have:
            raise ModelLoadError(f"{model_dir}: config.{key}={want} but the tokenizer maps {token} to {have}")


def freeze_vision_tower(model) -> int:
    """Freeze the vision encoder including its patch merger (``model.model.visual``). Returns #params frozen."""
    visual = model.get_base_model().model.visual if hasattr(model, "get_base_model") else model.model.visual
    n = 0
    for p in visual.parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n


def apply_lora(model, spec: LoraSpec, coord_ids: list[int]):
    """Wrap ``model`` with peft LoRA adapters (peft is imported only here)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ModelLoadError("model.lora is set but peft is not installed: pip install peft") from e
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules),
        trainable_token_indices={"embed_tokens": list(coord_ids)} if spec.train_coord_rows else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_model_and_processor(
    model_name_or_path: str | Path,
    *,
    add_coord_tokens: bool = True,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    freeze_vision: bool = False,
    lora: LoraSpec | dict | None = None,
    coord_init: str = "mean",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """Load ``(model, processor)`` from a local Qwen2/2.5/3-VL directory: a full model or a LoRA adapter.

    dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
    attn_implementation: passed to ``from_pretrained`` ("sdpa", "eager", "flash_attention_2", ...).
    The processor's tokenizer pads on the left and holds the coord tokens (added here if missing and
    ``add_coord_tokens``; see the module docstring for how their rows are initialised).
    A LoRA adapter directory is loaded as base + adapter, merged (:func:`load_adapter_checkpoint`); LoRA
    (``lora``) and freezing then apply to that merged model as to any other.
    """
    model_dir = Path(model_name_or_path)
    if not model_dir.is_dir():
        raise ModelLoadError(
            f"model directory {model_dir} does not exist (download the checkpoint and point model.model_name_or_path at it)"
        )
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if coord_init not in COORD_INITS:
        raise ModelLoadError(f"custom.coord_tokens.init must be one of {COORD_INITS}, got {coord_init!r}")
    lora_spec = _as_lora_spec(lora)
    options = dict(dtype=dtype, attn_implementation=attn_implementation, min_pixels=min_pixels, max_pixels=max_pixels)
    if is_adapter_dir(model_dir):
        model, processor = load_adapter_checkpoint(model_dir, coord_init=coord_init, **options)
    else:
        model, processor = _load_full_model(model_dir, add_coord_tokens=add_coord_tokens, coord_init=coord_init, **options)
    if freeze_vision:
        freeze_vision_tower(model)
    if lora_spec is not None:
        model = apply_lora(model, lora_spec, coord_token_ids(processor.tokenizer))
        if freeze_vision:  # peft already freezes the base; keep the rule explicit for adapters on the tower
            freeze_vision_tower(model)
    return model, processor


def _load_full_model(model_dir: Path, *, add_coord_tokens: bool, dtype: str, attn_implementation: str | None,
                     coord_init: str, min_pixels: int | None, max_pixels: int | None):
    """``(model, processor)`` of a directory with a ``config.json`` (options already validated)."""
    import transformers

    try:
        family = detect_family(model_dir)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e

    try:
        processor = load_processor(model_dir, min_pixels=min_pixels, max_pixels=max_pixels)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model_dir}: cannot load the tokenizer/processor ({_first_line(e)}); the directory must hold a complete checkpoint") from e
    tokenizer = processor.tokenizer
    n_before = add_missing_coord_tokens(tokenizer, add_coord_tokens, model_dir)  # fails before the model loads

    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = getattr(transformers, MODEL_CLASSES[family]).from_pretrained(str(model_dir), **kwargs)
    except OSError as e:  # missing / unreadable weight files
        raise ModelLoadError(f"{model_dir}: cannot load the model weights ({_first_line(e)}); the directory must hold a complete checkpoint") from e
    keep_used_weight_conversions(model)
    _check_vision_token_ids(model, tokenizer, model_dir)
    fit_coord_rows(model, tokenizer, n_before, coord_init, model_dir)
    return model, processor


def load_adapter_checkpoint(adapter_dir: str | Path, *, coord_init: str = "mean", dtype: str = "auto",
                            attn_implementation: str | None = None, min_pixels: int | None = None,
                            max_pixels: int | None = None):
    """``(merged model, processor)`` of a LoRA adapter directory (see :mod:`src.models.checkpoints`).

    1. The base model named in ``adapter_config.json`` is loaded like any model directory, coord tokens
       added exactly as the training run did when the base lacked them (rows initialised with that run's
       ``custom.coord_tokens.init``, read from its ``resolved_config.yaml``; ``coord_init`` when absent);
    2. the processor is the one saved WITH the adapter (its tokenizer has the coord tokens); it must have
       the same vocabulary as base + coord tokens;
    3. peft applies the adapter (LoRA weights and the trained coord rows) and it is merged
       (:func:`src.models.checkpoints.merge_adapters`): the result is a plain transformers model.
    A missing base model or a vocabulary mismatch raises ``ModelLoadError`` naming the path.
    """
    adapter_dir = Path(adapter_dir)
    try:
        base_dir = adapter_base_dir(adapter_dir)
        coord_init = training_coord_init(adapter_dir) or coord_init
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from None
    if is_adapter_dir(base_dir):
        raise ModelLoadError(f"{adapter_dir}: its base model {base_dir} is itself a LoRA adapter; export that one first (python -m src.export)")
    if coord_init not in COORD_INITS:
        raise ModelLoadError(f"{adapter_dir}: the run's custom.coord_tokens.init {coord_init!r} is not one of {COORD_INITS}")
    options = dict(dtype=dtype, attn_implementation=attn_implementation, min_pixels=min_pixels, max_pixels=max_pixels)
    model, processor = _load_full_model(base_dir, add_coord_tokens=True, coord_init=coord_init, **options)
    if has_tokenizer_files(adapter_dir):
        base_tokenizer = processor.tokenizer
        try:
            processor = load_processor(adapter_dir, min_pixels=min_pixels, max_pixels=max_pixels)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{adapter_dir}: cannot load the processor saved with the adapter ({_first_line(e)})") from e
        if len(processor.tokenizer) != len(base_tokenizer) or coord_token_ids(processor.tokenizer) != coord_token_ids(base_tokenizer):
            raise ModelLoadError(
                f"{adapter_dir}: its tokenizer ({len(processor.tokenizer)} tokens) is not the base model {base_dir}'s "
                f"plus the coord tokens ({len(base_tokenizer)} tokens); the adapter was trained on another base"
            )
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ModelLoadError(f"{adapter_dir} is a LoRA adapter but peft is not installed: pip install peft") from e
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (OSError, ValueError, RuntimeError) as e:  # missing adapter weights, shapes of another base
        raise ModelLoadError(f"{adapter_dir}: cannot apply the LoRA adapter to base {base_dir} ({_first_line(e)})") from e
    return merge_adapters(model).eval(), processor
