"""The CLI of ``python -m src.data.convert {coco,lvis,odvg,check}``: see :mod:`src.data.convert` and docs/datasets.md.

Writes ``--out`` (data-contract JSONL, one record per source image, ``eval`` ground truth included) and
``<out stem>.categories.json`` (the source category ids; ``src.eval --categories`` reads it), both
atomically, then prints a summary. Bad input: one line on stderr and exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from src.data.contract import DataError, load_jsonl
from src.data.convert.common import ConvertCounts, ConvertError, ConvertOptions, write_dataset
from src.data.convert.summary import AnswerLengths, Summary, summarize_records

EXIT_BAD_INPUT = 2


def readers() -> dict[str, Callable]:
    from src.data.convert.coco import read_source
    from src.data.convert.lvis import read_lvis
    from src.data.convert.odvg import read_odvg

    return {"coco": read_source, "lvis": read_lvis, "odvg": read_odvg}


def convert(fmt: str, ann: Path, images: Path, out: Path, geometry: str = "bbox", max_objects: int | None = None,
            max_new_tokens: int | None = None, count_tokens: Callable[[list[str]], list[int]] | None = None) -> Summary:
    """Convert one annotation file (``fmt``: coco / lvis / odvg) and return the summary. ``max_new_tokens``
    None skips the token counts; ``count_tokens`` replaces the Qwen tokenizer (tests)."""
    from src.data.convert.coco import checked_files

    if not images.is_dir():
        raise ConvertError(f"--images {images}: not a directory")
    if max_objects is not None and max_objects < 1:
        raise ConvertError(f"--max-objects must be >= 1, got {max_objects}")
    if fmt == "odvg" and geometry != "bbox":
        raise ConvertError("--geometry poly: ODVG has boxes only")
    counts = ConvertCounts()
    source, categories = readers()[fmt](ann, images, counts)
    lengths = AnswerLengths(count_tokens)
    write_dataset(checked_files(source), categories, ConvertOptions(out=out, geometry=geometry, max_objects=max_objects),
                  counts, on_record=lengths.add if max_new_tokens is not None else None, progress_total=len(source))
    if max_new_tokens is not None:
        lengths.flush()
    return Summary(images=counts.images, objects=counts.objects, per_category=counts.per_category,
                   objects_per_image=counts.objects_per_image, edge_cases=counts.edge_cases(),
                   answer_tokens=lengths.lengths, max_new_tokens=max_new_tokens)


def max_new_tokens_of(args: argparse.Namespace) -> int | None:
    """``--no-token-stats`` -> None; else ``--max-new-tokens``, else the ``--config``'s, else the default."""
    from src.config.loader import load_rollout_matching
    from src.config.schema import RolloutMatchingConfig

    if args.no_token_stats:
        return None
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise ConvertError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        return args.max_new_tokens
    return (load_rollout_matching(args.config) if args.config is not None else RolloutMatchingConfig()).max_new_tokens


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m src.data.convert", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="fmt", required=True)
    for fmt, what in (("coco", "COCO instances JSON"), ("lvis", "LVIS v1 JSON"), ("odvg", "ODVG detection JSONL")):
        p = sub.add_parser(fmt, help=f"convert a {what}")
        p.add_argument("--ann", required=True, type=Path, help=f"the {what}")
        p.add_argument("--images", required=True, type=Path,
                       help="image folder (LVIS: the COCO root holding train2017/ and val2017/)")
        p.add_argument("--out", required=True, type=Path, help="JSONL to write (image paths relative to its folder)")
        if fmt != "odvg":
            p.add_argument("--geometry", choices=("bbox", "poly"), default="bbox",
                           help="training objects as boxes (default) or polygons (the largest part; see docs/datasets.md)")
        p.add_argument("--max-objects", type=int, help="keep at most N training objects per image: the N largest by source area")
    p = sub.add_parser("check", help="validate a data-contract JSONL (and its image files) and print the summary")
    p.add_argument("jsonl", type=Path)
    for p in sub.choices.values():
        p.add_argument("--max-new-tokens", type=int, help="compare answer lengths with this (default: --config's, else 1024)")
        p.add_argument("--config", type=Path, help="a training YAML: take max_new_tokens from custom.extra.rollout_matching")
        p.add_argument("--no-token-stats", action="store_true", help="skip the answer-length count (no tokenizer)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from src.config.loader import ConfigError

    args = parser().parse_args(argv)
    try:
        max_new = max_new_tokens_of(args)
        if args.fmt == "check":
            records, _ = load_jsonl(args.jsonl)
            summary = summarize_records(records, max_new)
        else:
            summary = convert(args.fmt, args.ann, args.images, args.out, getattr(args, "geometry", "bbox"), args.max_objects, max_new)
    except (DataError, ConfigError) as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(summary.format())
    if args.fmt != "check":
        from src.data.convert.common import categories_path

        print(f"wrote {args.out} and {categories_path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
