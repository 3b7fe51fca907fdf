"""Checkpoints that appear only when complete, and the choice of the one to resume from.

A trainer checkpoint is written into ``<output_dir>/.checkpoint-<step>.partial`` and renamed to
``<output_dir>/checkpoint-<step>`` only after every rank has written its part (rename is atomic on one
file system). A run killed during a save therefore leaves a hidden ``.partial`` directory, never a
``checkpoint-<step>`` that resuming would pick and then fail on; the next save of that step replaces it.

Checkpoints written by other tools or older versions may still be incomplete: :func:`missing_parts`
says what a directory lacks, :func:`newest_complete` skips such directories.
"""

from __future__ import annotations

import re
from pathlib import Path

from src.utils.files import replace_dir

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
# Model weights as the Trainer writes them: full model, sharded index, LoRA adapter, FSDP state.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "adapter_model.safetensors", "adapter_model.bin")


def staging_dir(final: Path) -> Path:
    """Where ``final`` (``.../checkpoint-N``) is written before its rename: ``.../.checkpoint-N.partial``."""
    return final.parent / f".{final.name}.partial"


def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def missing_parts(ckpt: Path) -> list[str]:
    """What the directory ``ckpt`` lacks to be resumed from (``[]``: complete).

    Complete = the trainer state (written last) and model weights (a full model, a sharded index, a LoRA
    adapter, an FSDP state file or a DeepSpeed ``global_step*`` folder)."""
    if not ckpt.is_dir():
        return ["the directory itself"]
    missing = []
    if not (ckpt / TRAINER_STATE).is_file():
        missing.append(TRAINER_STATE)
    names = {p.name for p in ckpt.iterdir()}
    has_weights = bool(names & set(WEIGHT_FILES)) or any(n.startswith(("pytorch_model_fsdp", "global_step")) for n in names)
    if not has_weights:
        missing.append("model weights (" + " / ".join(WEIGHT_FILES[:2]) + ")")
    return missing


def checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` directories of ``output_dir``, newest (largest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p), reverse=True)


def newest_complete(output_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint of ``output_dir`` (None if there is none) and the incomplete
    ``checkpoint-N`` directories newer than it (skipped)."""
    skipped = []
    for ckpt in checkpoints(output_dir):
        if not missing_parts(ckpt):
            return ckpt, skipped
        skipped.append(ckpt)
    return None, skipped


def publish(staging: Path, final: Path) -> None:
    """Rename the finished ``staging`` directory to ``final`` (a ``final`` left by an earlier save of the
    same step is replaced only once the new one is in place)."""
    replace_dir(staging, final)
