"""Write a tiny, randomly initialised Qwen-VL model directory that loads like a real checkpoint.

    python -m src.models.build_tiny --arch qwen3_vl --out runs/tiny_qwen3_vl [--seed 0] [--preset demo]

The directory holds the real-vocabulary tokenizer (``build_qwen_tokenizer``: 151,643 BPE tokens, the
Qwen specials and ``<|coord_k|>`` = id 151669+k, chat template), the image-only processor, a model
built from config (vocab = ``len(tok)`` = 152,669, tied embeddings) and a generation config
(eos ``<|im_end|>`` 151645, pad ``<|endoftext|>`` 151643, greedy).

Presets:
    test  the smallest that exercises every code path: text hidden 64, 2 layers, 4 heads / 2 KV heads,
          head_dim 16; vision depth 2, hidden 32.
    demo  the recipe that learned horizontal position best on the CPU (measured): head_dim 32 with
          mrope_section scaled to sum 16 (Qwen2/2.5-VL [4,6,6], Qwen3-VL [6,5,5]), rope theta 1e4,
          text hidden 64 (Qwen3-VL 4 heads / 2 KV; Qwen2/2.5-VL, whose head_dim is hidden/heads,
          2 heads / 1 KV), vision hidden 64 and, for Qwen3-VL (the only family with learned vision
          position embeddings), a 2-D sinusoidal init of them.

Images: the processor caps them at 128*128 pixels, so a 128x128 image gives 16 image tokens after the
2x2 merge (Qwen2/2.5-VL resize it to 112x112, patch 14; Qwen3-VL keeps 128x128, patch 16).
Same seed and preset -> identical weights.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PRESETS = ("test", "demo")
MAX_IMAGE_PIXELS = 128 * 128
MERGE_SIZE = 2


@dataclass(frozen=True)
class TinyShape:
    """Sizes of one preset. Qwen2/2.5-VL derive head_dim = hidden / heads; Qwen3-VL sets it freely."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float | None  # None: the family's real default
    vision_hidden: int
    vision_heads: int
    sincos_vision_pos: bool


PRESET_SHAPES = {
    "test": TinyShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                      rope_theta=None, vision_hidden=32, vision_heads=2, sincos_vision_pos=False),
    "demo": TinyShape(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2, head_dim=32,
                      rope_theta=1e4, vision_hidden=64, vision_heads=4, sincos_vision_pos=True),
}
# mrope_section (t, h, w) in rotary frequency pairs; sums to head_dim / 2. Real checkpoints: Qwen2/2.5-VL
# [16, 24, 24], Qwen3-VL [24, 20, 20] (interleaved), both for head_dim 128.
MROPE_SECTION = {
    ("qwen2_vl", 16): [2, 3, 3], ("qwen2_vl", 32): [4, 6, 6],
    ("qwen2_5_vl", 16): [2, 3, 3], ("qwen2_5_vl", 32): [4, 6, 6],
    ("qwen3_vl", 16): [4, 2, 2], ("qwen3_vl", 32): [6, 5, 5],
}
DEFAULT_ROPE_THETA = {"qwen2_vl": 1e6, "qwen2_5_vl": 1e6, "qwen3_vl": 5e6}
PATCH_SIZE = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}


def _token_ids(tok) -> dict[str, int]:
    names = {
        "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
        "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>",
    }
    return {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}


def tiny_config(arch: str, preset: str, tokenizer):
    """The ``*Config`` of a tiny model of ``arch`` whose vocabulary and token ids match ``tokenizer``."""
    import transformers

    if arch not in ARCHS or preset not in PRESETS:
        raise ValueError(f"arch must be one of {ARCHS} and preset one of {PRESETS}; got {arch!r}, {preset!r}")
    s = PRESET_SHAPES[preset]
    ids = _token_ids(tokenizer)
    heads = s.heads if arch == "qwen3_vl" else s.hidden // s.head_dim  # Qwen2/2.5: head_dim = hidden / heads
    kv_heads = max(1, heads * s.kv_heads // s.heads)  # keep the preset's query/KV ratio
    rope = {"rope_type": "default", "mrope_section": MROPE_SECTION[arch, s.head_dim],
            "rope_theta": s.rope_theta or DEFAULT_ROPE_THETA[arch]}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, rope_parameters=rope,
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
    )
    vision = dict(depth=2, num_heads=s.vision_heads, patch_size=PATCH_SIZE[arch], spatial_merge_size=MERGE_SIZE,
                  temporal_patch_size=2)
    if arch == "qwen2_vl":
        config_cls = transformers.Qwen2VLConfig
        vision.update(embed_dim=s.vision_hidden, hidden_size=s.hidden, mlp_ratio=2)
    elif arch == "qwen2_5_vl":
        config_cls = transformers.Qwen2_5_VLConfig
        vision.update(hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden, out_hidden_size=s.hidden,
                      window_size=112, fullatt_block_indexes=[1])
    else:
        config_cls = transformers.Qwen3VLConfig
        text.update(head_dim=s.head_dim)
        rope["mrope_interleaved"] = True
        side = math.isqrt(MAX_IMAGE_PIXELS) // PATCH_SIZE[arch]  # 8: the patch grid of a 128x128 image
        vision.update(hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden, out_hidden_size=s.hidden,
                      num_position_embeddings=side * side, deepstack_visual_indexes=[0])
    return config_cls(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
    )


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """2-D sinusoidal table for a ``side x side`` grid, row-major: ``[side*side, dim]``.

    First half of the channels encodes the row (y), second half the column (x), each as
    sin/cos pairs over geometric frequencies (MAE-style, base 1e4, amplitude 1).
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # [dim/4]
    pos = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # [side, side]

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * freqs  # [side*side, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # [side*side, dim]


def build_tiny_model(arch: str, tokenizer, seed: int = 0, preset: str = "test"):
    """A randomly initialised ``*ForConditionalGeneration`` (float32, eval mode), deterministic in ``seed``."""
    import transformers

    from src.models.loading import MODEL_CLASSES

    config = tiny_config(arch, preset, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[arch])(config).eval()
    if PRESET_SHAPES[preset].sincos_vision_pos and hasattr(model.model.visual, "pos_embed"):
        pos = model.model.visual.pos_embed
        side = math.isqrt(pos.num_embeddings)
        with torch.no_grad():
            pos.weight.copy_(sincos_2d(side, pos.embedding_dim))
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.text_config.bos_token_id, eos_token_id=config.text_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    return model


def build_tiny_processor(arch: str, tokenizer):
    """The image-only processor of a tiny model: images capped at 128*128 pixels (16 tokens at 128 px)."""
    from src.models.processor import PROCESSOR_CLASSES, Qwen2VLImageProcessorPil

    patch = PATCH_SIZE[arch]
    factor = patch * MERGE_SIZE
    image_kwargs = dict(patch_size=patch, merge_size=MERGE_SIZE, temporal_patch_size=2,
                        min_pixels=4 * factor * factor, max_pixels=MAX_IMAGE_PIXELS)
    if arch == "qwen3_vl":  # Qwen3-VL normalises with mean = std = 0.5
        image_kwargs.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return PROCESSOR_CLASSES[arch](
        image_processor=Qwen2VLImageProcessorPil(**image_kwargs), tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def build_tiny_model_dir(
    out_dir: str | Path, arch: str, seed: int = 0, preset: str = "test", *, tokenizer=None
) -> Path:
    """Write model, tokenizer, processor and generation config of a tiny ``arch`` model to ``out_dir``.

    ``tokenizer``: a ``build_qwen_tokenizer()`` result to reuse (saves ~3 s per call); built if None.
    """
    from transformers.utils import logging as hf_logging

    from src.models.tokenizer import build_qwen_tokenizer

    tokenizer = tokenizer if tokenizer is not None else build_qwen_tokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(arch, tokenizer, seed=seed, preset=preset)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one tiny shard: the "Writing model shards" bar is noise
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    build_tiny_processor(arch, tokenizer).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.models.build_tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True, choices=ARCHS)
    ap.add_argument("--out", required=True, help="directory to write the model to")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=PRESETS, default="test")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    out = build_tiny_model_dir(args.out, args.arch, seed=args.seed, preset=args.preset)
    print(f"wrote tiny {args.arch} ({args.preset}, seed {args.seed}) to {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
