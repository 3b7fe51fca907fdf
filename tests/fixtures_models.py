"""Session fixtures: tiny model dirs of every Qwen-VL family, loaded once, and a "real-layout" checkpoint.

Registered for every test module via ``pytest_plugins`` in conftest.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from src.models.build_tiny import ARCHS

# Tiny test models: built once per session from the shared offline tokenizer (~0.7 s per arch).


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, qwen_tokenizer) -> dict[str, Path]:
    """arch -> directory of a tiny ``test``-preset model (seed 0)."""
    from src.models.build_tiny import build_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model_dir(root / arch, arch, seed=0, tokenizer=qwen_tokenizer) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dirs):
    """arch -> (model, processor) loaded with ``load_model_and_processor`` defaults (eval mode)."""
    from src.models.loading import load_model_and_processor

    return {arch: load_model_and_processor(d) for arch, d in tiny_model_dirs.items()}


@pytest.fixture(scope="session")
def demo_model_dirs(tmp_path_factory, qwen_tokenizer) -> dict[str, Path]:
    """arch -> a tiny ``demo``-preset model (head_dim 32, which vLLM's CPU attention accepts) for Qwen3-VL and
    Qwen2.5-VL, float32, with every matrix scaled x4: at the stock init a greedy rollout repeats one token,
    which would make a parity check between two engines nearly vacuous."""
    import torch

    from src.models.build_tiny import build_tiny_model_dir
    from src.models.loading import load_model_and_processor

    root = tmp_path_factory.mktemp("demo_models")
    out = {}
    for arch in ("qwen3_vl", "qwen2_5_vl"):
        d = build_tiny_model_dir(root / arch, arch, seed=0, preset="demo", tokenizer=qwen_tokenizer)
        model, _ = load_model_and_processor(d)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(4.0)
        model.save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(scope="session")
def sample_images():
    """Two deterministic RGB images of different sizes: 128x128 and 200x96 (w x h)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (96, 200, 3), dtype=np.uint8)),
    ]


def strip_coord_tokens(tokenizer_json: Path) -> None:
    """Remove the ``<|coord_k|>`` added tokens from a saved ``tokenizer.json`` (a tokenizer that lacks them)."""
    data = json.loads(tokenizer_json.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if not t["content"].startswith("<|coord_")]
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


@pytest.fixture(scope="session")
def qwen_like_checkpoint(tmp_path_factory, tiny_model_dirs) -> Path:
    """A tiny Qwen2.5-VL in the layout of a real Hub checkpoint, without coord tokens.

    Like Qwen/Qwen2.5-VL-*: 151,669 tokens but 151,936 embedding rows, untied output embeddings,
    ``preprocessor_config.json`` (min/max_pixels, torchvision ``image_processor_type``,
    ``processor_class: Qwen2_5_VLProcessor``) and a legacy ``chat_template.json``.
    """
    import torch
    import transformers

    from src.models.build_tiny import tiny_config
    from src.models.tokenizer import CHAT_TEMPLATE

    out = tmp_path_factory.mktemp("qwen_like")
    src = tiny_model_dirs["qwen2_5_vl"]
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")
    strip_coord_tokens(out / "tokenizer.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 151669

    config = tiny_config("qwen2_5_vl", "test", tokenizer)
    config.text_config.vocab_size = 151936
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return out
