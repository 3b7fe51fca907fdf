"""Batched inference with the training prompt: one predictions line per image of a data-contract JSONL.

    python -m src.infer --model DIR --jsonl val.jsonl --out pred.jsonl [--config x.yaml] [--limit N]

Decoding (engine, mode, max_new_tokens, batch size, repeat guard) comes from
``custom.extra.rollout_matching`` of ``--config`` (a training config or a YAML with just that section);
without it the defaults (greedy, the HF engine). With ``backend: vllm`` the vLLM engine generates (the
model is loaded on the CPU and its weights pushed to the engine, as in training); in float32 it writes
the same ``raw_text``. Prompt, image loading, generation and parsing are the training code's own
(``src.data.prompt``, ``src.data.images``, ``src.rollout.encoding``, the rollout engine
(``src.rollout.backends.build_engine``), ``parse_rollout``).

Output, one line per image, in input order (all coordinates in PIXELS; ``python -m src.eval`` reads it)::

    {"image": "/abs/path.png", "width": W, "height": H, "id": "...",            # id when the record has one
     "gt":   [{"desc": ..., "bbox_2d": [x1, y1, x2, y2]} | {"desc": ..., "poly": [x1, y1, ...]}],
     "pred": [...same shape: the parser's VALID objects, in appearance order...],
     "raw_text": "<decoded response, special tokens kept>",
     "truncated": bool,            # the answer ran out before its closing "}" (structure intact)
     "malformed": bool,            # the answer's JSON structure broke (never together with truncated)
     "hit_max_new_tokens": bool,   # generation stopped at max_new_tokens
     "dropped_invalid": int,       # invalid objects the parser dropped
     "eval": {...}}                # the record's evaluation-only ground truth, copied (only when it has one)

GT: the JSONL's own pixel values when given in pixels, else its bins through the codec. Predictions:
bins through :func:`src.data.coords.bins_to_pixels`, rounded to 3 decimals (round-trips to the same
bins). The file is written to a temporary file next to ``--out`` and renamed at the end.

A missing file, a bad record, an image whose size differs from its record's ``width``/``height``
(checked on the headers before the model loads), a bad config or a directory that is not a model: one
line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from src.config.loader import ConfigError, load_rollout_matching
from src.config.schema import RolloutMatchingConfig
from src.data.contract import DataError, Record, load_jsonl
from src.data.coords import bins_to_pixels
from src.data.images import check_record_images
from src.data.objects import DetObject

PIXEL_DECIMALS = 3  # >= 3 keeps distinct bins distinct and round-trips to the same bins for any D >= 2


class InferError(ValueError):
    """Bad command-line input; ``str(e)`` is one line."""


def pixel_object(obj: DetObject, pixels: Sequence[float], decimals: int | None = PIXEL_DECIMALS) -> dict[str, Any]:
    """A data-contract object ``{"desc", "bbox_2d" | "poly"}`` with the given flat pixel coordinates,
    rounded to ``decimals`` (None: kept exactly)."""
    return {"desc": obj.desc, obj.geometry: [v if decimals is None else round(float(v), decimals) for v in pixels]}


def gt_pixel_objects(record: Record) -> list[dict[str, Any]]:
    """The record's GT in pixels: its original values, unrounded, when it was given in pixels (COCO
    polygons keep their exact masks), else via the codec."""
    if record.pixel_objects is not None:
        return [pixel_object(o, px, decimals=None) for o, px in zip(record.objects, record.pixel_objects)]
    return [pixel_object(o, bins_to_pixels(o.bins, record.width, record.height)) for o in record.objects]


def prediction_line(record: Record, parsed, raw_text: str, hit_max_new_tokens: bool = False) -> dict[str, Any]:
    """One output line from a record and its :class:`src.rollout_matching.parser.ParseResult`."""
    line: dict[str, Any] = {"image": str(record.image.resolve()), "width": record.width, "height": record.height}
    if record.id is not None:
        line["id"] = record.id
    preds = [o.to_det_object() for o in parsed.objects]
    line.update({
        "gt": gt_pixel_objects(record),
        "pred": [pixel_object(o, bins_to_pixels(o.bins, record.width, record.height)) for o in preds],
        "raw_text": raw_text,
        "truncated": parsed.truncated,
        "malformed": parsed.malformed,
        "hit_max_new_tokens": hit_max_new_tokens,
        "dropped_invalid": parsed.dropped_invalid,
    })
    if record.eval is not None:  # crowd regions, source boxes/areas, LVIS fields: for src.eval
        line["eval"] = record.eval.to_json()
    return line


def load_model(model_dir: Path, device: str):
    """``(model, processor)`` on ``device`` in eval mode; a directory that is not a model -> InferError."""
    from src.models.loading import ModelLoadError, load_model_and_processor

    if not model_dir.is_dir():
        raise InferError(f"--model {model_dir}: not a directory")
    try:
        model, processor = load_model_and_processor(model_dir)
    except (ModelLoadError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InferError(f"--model {model_dir}: cannot load a model ({first})") from None
    return model.to(device).eval(), processor


def run_inference(model, processor, records: Sequence[Record], rm: RolloutMatchingConfig, out: Path) -> None:
    """Generate, parse and write one line per record to ``out`` (atomically: temp file + rename)."""
    from tqdm import tqdm

    from src.data.images import load_image
    from src.data.prompt import prompt_text
    from src.rollout_matching.parser import parse_rollout
    from src.rollout.encoding import encode_prompt
    from src.rollout.backends import build_engine
    from src.rollout_matching.tokens import token_table

    table = token_table(processor.tokenizer)
    engine = build_engine(rm, table, processor.tokenizer.pad_token_id, processor=processor)
    prompt = prompt_text(processor)
    bs = engine.settings.decode_batch_size
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as dst, tqdm(total=len(records), desc="infer", unit="img", file=sys.stderr, disable=None) as bar:
            for start in range(0, len(records), bs):
                chunk = records[start : start + bs]
                prompts = [encode_prompt(processor, load_image(r.image, r.source), prompt) for r in chunk]
                for record, rollout in zip(chunk, engine.generate(model, prompts)):
                    parsed = parse_rollout(rollout.response_ids, table)
                    line = prediction_line(record, parsed, table.text(rollout.response_ids), rollout.hit_max_new_tokens)
                    dst.write(json.dumps(line, ensure_ascii=False) + "\n")
                bar.update(len(chunk))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        engine.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.infer", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="model directory (a run's output dir or a checkpoint)")
    ap.add_argument("--jsonl", required=True, type=Path, help="data-contract JSONL (its GT is copied to the output)")
    ap.add_argument("--out", required=True, type=Path, help="predictions JSONL to write")
    ap.add_argument("--config", type=Path, help="YAML with custom.extra.rollout_matching (decoding); default: greedy defaults")
    ap.add_argument("--limit", type=int, help="only the first N images")
    ap.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    args = ap.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise InferError(f"--limit must be >= 1, got {args.limit}")
        args.out.parent.mkdir(parents=True, exist_ok=True)  # a new output folder is created
        rm = load_rollout_matching(args.config) if args.config is not None else RolloutMatchingConfig()
        if not args.jsonl.is_file():
            raise InferError(f"--jsonl {args.jsonl}: file not found")
        records, _ = load_jsonl(args.jsonl, limit=args.limit)
        if not records:
            raise InferError(f"--jsonl {args.jsonl}: no records")
        check_record_images(records)  # every image opens and has the record's width x height (headers only)
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if rm.backend == "vllm":
            device = "cpu"  # the engine generates on its own copy: the model here only lends it its weights
        model, processor = load_model(args.model, device)
        run_inference(model, processor, records, rm, args.out)
    except (InferError, ConfigError, DataError) as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} predictions to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
