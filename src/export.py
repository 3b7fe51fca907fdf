"""Write a clean, self-contained model directory from a checkpoint of this project.

    python -m src.export --checkpoint DIR --out DIR

``--checkpoint`` is either
  * a LoRA adapter (a LoRA run's ``output_dir`` or one of its trainer ``checkpoint-N``): the base model
    named in ``adapter_config.json`` + the adapter, merged (LoRA weights and the trained coord-token rows
    folded in), with the processor saved with the adapter; or
  * a full model (a run without LoRA, its ``checkpoint-N``, a ``merged/`` dir, ``build_tiny`` output):
    re-saved as a clean model directory — weights, config, generation config, processor; no optimizer,
    scheduler, RNG or trainer state.
It must carry the coord tokens (every directory this project writes does); a Hub checkpoint without
them is refused, there is nothing of ours to export.

``--out`` then loads with this project's loader, with ``AutoModelForImageTextToText`` and, where
torchvision exists, ``AutoProcessor`` / vLLM: every class it names is a stock transformers class of the
family (``Qwen3VLForConditionalGeneration``, ``Qwen3VLProcessor``, ``Qwen2VLImageProcessor``, ...).
Weights keep the checkpoint's dtype. The directory is written to a temporary directory next to
``--out`` and renamed at the end; an existing ``--out`` is refused.

A bad input (missing or non-model directory, a missing base model, an existing ``--out``): one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from src.models.checkpoints import CheckpointError, is_adapter_dir, write_model_dir

EXIT_BAD_INPUT = 2


class ExportError(ValueError):
    """Bad command-line input; ``str(e)`` is one line."""


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> str:
    """Write the model of ``checkpoint`` to ``out`` (see the module docstring). Returns the kind exported:
    ``"lora"`` (merged) or ``"full"`` (re-saved). Raises :class:`ExportError` / ``ModelLoadError`` /
    :class:`CheckpointError` with one line."""
    from src.models.loading import MissingCoordTokensError, load_model_and_processor

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise ExportError(f"--checkpoint {checkpoint}: not a directory")
    if out.exists():
        raise ExportError(f"--out {out} already exists; choose a new directory or remove it")
    adapter = is_adapter_dir(checkpoint)
    if not adapter and not (checkpoint / "config.json").is_file():
        raise ExportError(f"--checkpoint {checkpoint}: neither a model (config.json) nor a LoRA adapter (adapter_config.json)")
    try:
        model, processor = load_model_and_processor(checkpoint, add_coord_tokens=False)
    except MissingCoordTokensError:
        raise ExportError(
            f"--checkpoint {checkpoint}: its tokenizer has no coord tokens, so it is not a checkpoint of this project; nothing to export"
        ) from None
    write_model_dir(model, processor, out)
    return "lora" if adapter else "full"


def main(argv: list[str] | None = None) -> int:
    from src.models.loading import ModelLoadError

    ap = argparse.ArgumentParser(prog="python -m src.export", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=Path, help="a LoRA run dir / checkpoint-N (merged) or a full model dir (re-saved)")
    ap.add_argument("--out", required=True, type=Path, help="model directory to create (must not exist)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        kind = export_checkpoint(args.checkpoint, args.out)
    except (ExportError, ModelLoadError, CheckpointError) as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    what = "merged LoRA adapter + base" if kind == "lora" else "re-saved full model"
    print(f"wrote {args.out} ({what} from {args.checkpoint}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
