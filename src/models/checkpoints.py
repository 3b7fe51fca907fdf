"""The model directories this project reads and writes, and the one way to write and merge them.

Two kinds of directory:

* a **full model**: ``config.json`` + weights + processor files. ``build_tiny`` output, a run without
  LoRA and its trainer ``checkpoint-N``, a LoRA run's ``merged/``, ``python -m src.export`` output, a
  Hub checkpoint.
* a **LoRA adapter**: ``adapter_config.json`` + adapter weights (peft) + the processor saved with it
  (tokenizer WITH the coord tokens), and no ``config.json``. A LoRA run's ``output_dir`` and its
  ``checkpoint-N``. Its base model is the directory named by ``base_model_name_or_path`` in
  ``adapter_config.json`` (an absolute path, or relative to the current directory, as peft reads it).

:func:`write_model_dir` (temp dir + rename) and :func:`merge_adapters` are shared by the launcher's
``output_dir/merged`` and ``python -m src.export``. This module only reads JSON / YAML; peft and
transformers come in through the objects passed to it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import yaml

from src.utils.files import replace_dir

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "resolved_config.yaml"  # written by python -m src.sft into training.output_dir
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
COORD_INIT_KEY = ("custom", "coord_tokens", "init")


class CheckpointError(ValueError):
    """A model directory that cannot be used as asked; ``str(e)`` is one line naming the path."""


def is_adapter_dir(model_dir: str | Path) -> bool:
    """True for a LoRA adapter directory: ``adapter_config.json`` and no ``config.json``."""
    d = Path(model_dir)
    return (d / ADAPTER_CONFIG).is_file() and not (d / "config.json").is_file()


def has_tokenizer_files(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds a saved tokenizer."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def adapter_base_dir(adapter_dir: str | Path) -> Path:
    """The base model directory of a LoRA adapter (``base_model_name_or_path``); it must exist."""
    config = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config}: cannot read it ({e})") from None
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{config}: no base_model_name_or_path; set it to the base model's directory")
    path = Path(base)
    if not path.is_dir():
        raise CheckpointError(
            f"{config}: base model {base} (base_model_name_or_path) does not exist; "
            "put the base model there or edit base_model_name_or_path to point at it"
        )
    return path


def tokenizer_dir(model_dir: str | Path) -> Path:
    """Where the tokenizer of ``model_dir`` lives: the directory itself when it holds one (every
    directory this project writes, adapters included), else an adapter's base model."""
    d = Path(model_dir)
    if not has_tokenizer_files(d) and is_adapter_dir(d):
        return adapter_base_dir(d)
    return d


def training_coord_init(adapter_dir: str | Path) -> str | None:
    """``custom.coord_tokens.init`` of the run that wrote ``adapter_dir``, or None when unknown.

    Read from ``resolved_config.yaml`` in the directory (a run's ``output_dir``) or its parent (a
    trainer ``checkpoint-N``). Matters only when the base model lacked the coord tokens: their rows were
    then initialised by that method before training, and the adapter stores changes relative to them.
    """
    d = Path(adapter_dir)
    for candidate in (d / RUN_CONFIG, d.parent / RUN_CONFIG):
        if not candidate.is_file():
            continue
        try:
            value = yaml.safe_load(candidate.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise CheckpointError(f"{candidate}: cannot read it ({str(e).splitlines()[0]})") from None
        for key in COORD_INIT_KEY:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{candidate}: {'.'.join(COORD_INIT_KEY)} must be a string, got {value!r}")
        return value
    return None


def merge_adapters(model):
    """The plain transformers model of a peft LoRA model: LoRA weights and the trainable coord-token rows
    folded into the base weights (tied output embeddings follow). Works IN PLACE on the base weights."""
    merged = model.merge_and_unload()
    left = [name for name, _ in merged.named_modules() if "lora_" in name or "token_adapter" in name]
    if left:
        raise RuntimeError(f"merging the LoRA adapters left peft modules behind: {left[:3]}")
    return merged


def write_model_dir(model, processor, out: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``model`` (weights, config, generation config) and ``processor`` into ``out`` atomically.

    Everything is written to a temporary directory next to ``out`` and renamed at the end, so ``out``
    is either complete or absent. An existing ``out`` is an error unless ``overwrite``; then it is
    replaced only after the new directory is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose a new directory or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # not mkdtemp: that one is private (0700), the model dir must get the usual umask mode
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
