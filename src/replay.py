"""Replay recorded rollouts through the stage-2 pipeline offline: parse -> match -> Y_train (SPEC §6-§13).

    python -m src.replay --model DIR --rollouts IN.jsonl --out OUT.jsonl [--config x.yaml]

Tune ``maskiou_gate``, ``candidate_top_k``, the FP/FN costs or the OT knobs on real rollouts without a
GPU: only the model's tokenizer is loaded. The knobs come from ``custom.extra.rollout_matching`` of
``--config`` (a YAML holding just that section, or a full training config); without ``--config`` the
defaults of :class:`src.config.schema.RolloutMatchingConfig` (SPEC §12) apply.

Input, one JSON object per line::

    {"id": "img_0001", "response_token_ids": [90, 1, ...],          # or "response_text": "{\\"object_1\\": ..."
     "objects": [{"desc": "cat", "bbox_2d": [10, 20, 200, 300]},    # GT, in bins 0..999 (ints or
                 {"desc": "kite", "poly": ["<|coord_5|>", ...]}]}   #   "<|coord_k|>" strings)

Exactly one of ``response_token_ids`` (the generated ids, prompt removed) and ``response_text`` (then
tokenised with the model's tokenizer). ``objects`` follows the data contract (SPEC §2) in bins; use
``[]`` for an image without objects. Other keys are ignored.

Output, one line per input line in the same order (positions are 0-based token indices)::

    id, truncated, malformed, fallback, cut_backoffs, dropped_invalid, max_object_index,
    valid_objects      [{key, geometry, bins, coord_positions}]   coord_positions: in the response
    prefix_text
    matches            [[pred_i, gt_j]]   pred_i indexes valid_objects, gt_j the input objects
    match_iou          [float]            maskIoU of each match (diagnostic only, never a metric)
    fp                 [pred_i]           predictions the matcher left unmatched
    fn                 [gt_j]             GT appended to Y_train, ascending: the matcher's FN plus any
                                          matched GT whose prefix targets could not be built (the
                                          fragment itself lists them in canonical "sorted" order)
    gating_rejections, matched_for_supervision, excluded_from_supervision, fn_appended
    fragment, y_train_text (decoded Y_train, ending with <|im_end|>), ce_token_count
    coord_targets      [[pos, bin, "prefix" | "tail"]]   pos: in Y_train
    timing_ms          {parse, match, targets}           perf_counter inside this process

The LAST line on stderr is one JSON object: the SPEC §13 counters summed over the file
(``rollout/parse_dropped_invalid``, ``rollout/parse_truncated``, ``rollout/parse_malformed``, ``rollout/valid_pred_objects``,
``rollout/matched_for_supervision``, ``rollout/excluded_from_supervision``, ``rollout/fn_appended``,
``rollout/gating_rejections``, ``rollout/gt_objects``, ``rollout/match_rate`` = matched_for_supervision /
gt_objects), ``samples`` and ``ms_per_sample`` (mean parse / match / targets times).

A bad input line, a bad config or a model directory without a tokenizer: one line on stderr naming
the problem (``IN.jsonl:LINE: ...`` for input lines), exit code 2, and no OUT file (the output is
written to a temporary file next to OUT and renamed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from src.config.loader import ConfigError, load_rollout_matching
from src.config.schema import RolloutMatchingConfig
from src.data.contract import DataError, iter_jsonl, parse_record
from src.data.objects import DetObject
from src.models.checkpoints import TOKENIZER_FILES, CheckpointError, has_tokenizer_files, tokenizer_dir
from src.rollout_matching.matcher import match_objects
from src.rollout_matching.ot import prefix_targets_batch
from src.rollout_matching.parser import parse_rollout, prefix_text
from src.rollout_matching.stats import match_kwargs
from src.rollout_matching.targets import build_train_target
from src.rollout_matching.tokens import TokenTable, token_table

FN_ORDERING = "sorted"
TIMINGS = ("parse", "match", "targets")
COUNTERS = (  # training's rollout counters (SPEC §13 names), without the "rollout/" prefix
    "parse_dropped_invalid", "parse_truncated", "parse_malformed", "valid_pred_objects", "matched_for_supervision",
    "excluded_from_supervision", "fn_appended", "gating_rejections", "gt_objects",
)


class ReplayError(ValueError):
    """Bad command-line input (model dir, rollouts file, output path). ``str(e)`` is one line."""


@dataclass(frozen=True)
class Rollout:
    """One validated input line. ``gts`` are in bins and in input order."""

    id: str
    response_ids: list[int]
    gts: tuple[DetObject, ...]


# ------------------------------------------------------------------------------------------ input


def load_token_table(model_dir: str | Path) -> TokenTable:
    """The :class:`TokenTable` of the tokenizer saved in ``model_dir`` (coord tokens added if missing).

    Cached per directory within a process (``main`` called repeatedly from tests or a notebook).
    """
    return _load_token_table(str(Path(model_dir).resolve()))


@lru_cache(maxsize=4)
def _load_token_table(model_dir: str) -> TokenTable:
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy import, only for the CLI

    from src.models.tokenizer import add_coord_tokens  # noqa: PLC0415 - imports tokenizers

    path = Path(model_dir)
    if not path.is_dir():
        raise ReplayError(f"--model {model_dir}: not a directory")
    try:
        path = tokenizer_dir(path)  # a LoRA adapter dir holds the run's tokenizer; one without: its base model's
    except CheckpointError as e:
        raise ReplayError(f"--model {model_dir}: {e}") from None
    if not has_tokenizer_files(path):
        raise ReplayError(f"--model {model_dir}: no tokenizer files ({' / '.join(TOKENIZER_FILES)}); pass a model directory saved with its tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        add_coord_tokens(tokenizer)
        return token_table(tokenizer)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReplayError(f"--model {model_dir}: cannot load its tokenizer ({first})") from None


def read_rollout(obj: Any, table: TokenTable, where: str) -> Rollout:
    """Validate one decoded input line (raises :class:`DataError` starting with ``where``)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise DataError(f"{where}: missing \"id\"; give every line a string id such as \"img_0001\"")
    rid = obj["id"]
    if not isinstance(rid, str):
        raise DataError(f"{where}: \"id\" must be a string, got {rid!r}; quote it")
    sources = [k for k in ("response_token_ids", "response_text") if k in obj]
    if len(sources) != 1:
        found = "both" if sources else "neither"
        raise DataError(f"{where}: give exactly one of \"response_token_ids\" or \"response_text\" (found {found})")
    if sources[0] == "response_text":
        text = obj["response_text"]
        if not isinstance(text, str):
            raise DataError(f"{where}: \"response_text\" must be a string, got {type(text).__name__}")
        ids = table.encode(text)
    else:
        ids = obj["response_token_ids"]
        if not isinstance(ids, list):
            raise DataError(f"{where}: \"response_token_ids\" must be a list of token ids, got {type(ids).__name__}")
        for i, t in enumerate(ids):
            if type(t) is not int or t < 0:
                raise DataError(f"{where}: \"response_token_ids\"[{i}] = {t!r} is not a token id (an int >= 0)")
    return Rollout(id=rid, response_ids=ids, gts=read_objects(obj.get("objects"), where))


def read_objects(objects: Any, where: str) -> tuple[DetObject, ...]:
    """GT objects of one line in the data contract (SPEC §2) with coordinates in bins, in input order."""
    if not isinstance(objects, list):
        raise DataError(f"{where}: needs an \"objects\" list of GT objects in bins (use [] for none), got {objects!r}")
    # The object rules (desc, exactly one geometry, bins, NFC desc) live in parse_record: validate through
    # it as a "coords": "bins" record; its image and size are placeholders, unused in bins mode.
    record = {"images": ["-"], "width": 1000, "height": 1000, "coords": "bins", "objects": objects}
    return parse_record(record, Path("."), where, check_image=False).objects


def check_knobs(rm: RolloutMatchingConfig, source: str) -> None:
    """Range checks of the matching / OT knobs, done by the functions that use them, before any work."""
    try:
        match_objects([], [], **match_kwargs(rm))
        prefix_targets_batch([], ot_cost=rm.ot_cost, ot_epsilon=rm.ot_epsilon, ot_iters=rm.ot_iters)
    except ValueError as e:
        raise ConfigError(f"{source}: custom.extra.rollout_matching: {e}") from None


# ------------------------------------------------------------------------------------ the replay


def replay_rollout(response_ids: Sequence[int], gts: Sequence[DetObject], table: TokenTable, rm: RolloutMatchingConfig) -> dict[str, Any]:
    """parse -> match -> Y_train for one rollout; the output record (without ``id``), see the module docstring."""
    t0 = time.perf_counter()
    parsed = parse_rollout(response_ids, table)
    t1 = time.perf_counter()
    match = match_objects([o.to_det_object() for o in parsed.objects], gts, **match_kwargs(rm))
    t2 = time.perf_counter()
    target = build_train_target(
        parsed, gts, match, table, ot_cost=rm.ot_cost, ot_epsilon=rm.ot_epsilon, ot_iters=rm.ot_iters,
        supervise_eos=rm.supervise_eos, fn_ordering=FN_ORDERING,
    )
    t3 = time.perf_counter()

    fn = sorted(target.fn_gt)  # the matcher's FN plus matched GT whose targets could not be built
    return {
        "truncated": parsed.truncated,
        "malformed": parsed.malformed,
        "fallback": parsed.fallback,
        "cut_backoffs": parsed.cut_backoffs,
        "dropped_invalid": parsed.dropped_invalid,
        "max_object_index": parsed.max_object_index,
        "valid_objects": [
            {"key": o.key, "geometry": o.geometry, "bins": list(o.bins), "coord_positions": list(o.coord_positions)}
            for o in parsed.objects
        ],
        "prefix_text": prefix_text(parsed, table),
        "matches": [list(m) for m in match.matches],
        "match_iou": [round(v, 4) for v in match.match_iou],
        "fp": list(match.fp),
        "fn": fn,
        "gating_rejections": match.gating_rejections,
        "matched_for_supervision": target.matched_for_supervision,
        "excluded_from_supervision": target.excluded_from_supervision,
        "fn_appended": target.fn_appended,
        "fragment": target.fragment.text,
        "y_train_text": table.text(target.y_ids),
        "ce_token_count": len(target.ce_positions),
        "coord_targets": [list(c) for c in target.coord_targets],
        "timing_ms": {name: round((b - a) * 1e3, 4) for name, a, b in zip(TIMINGS, (t0, t1, t2), (t1, t2, t3))},
    }


@dataclass
class Totals:
    """SPEC §13 counters summed over replayed rollouts, plus mean timings."""

    samples: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMINGS, 0.0))

    def add(self, record: dict[str, Any], num_gts: int) -> None:
        self.samples += 1
        c = self.counts
        c["parse_dropped_invalid"] += record["dropped_invalid"]
        c["parse_truncated"] += int(record["truncated"])
        c["parse_malformed"] += int(record["malformed"])
        c["valid_pred_objects"] += len(record["valid_objects"])
        for k in ("matched_for_supervision", "excluded_from_supervision", "fn_appended", "gating_rejections"):
            c[k] += record[k]
        c["gt_objects"] += num_gts
        for k in TIMINGS:
            self.ms[k] += record["timing_ms"][k]

    def summary(self) -> dict[str, Any]:
        c = self.counts
        out: dict[str, Any] = {f"rollout/{k}": v for k, v in c.items()}
        out["rollout/match_rate"] = c["matched_for_supervision"] / c["gt_objects"] if c["gt_objects"] else 0.0
        out["samples"] = self.samples
        out["ms_per_sample"] = {k: round(v / self.samples, 4) if self.samples else 0.0 for k, v in self.ms.items()}
        return out


def replay_file(rollouts: Path, out: Path, table: TokenTable, rm: RolloutMatchingConfig) -> Totals:
    """Replay every line of ``rollouts`` into ``out`` (atomically: temp file + rename)."""
    from tqdm import tqdm  # noqa: PLC0415

    total = 0
    with open(rollouts, "rb") as f:  # count lines for the progress bar; fail fast on non-UTF-8 bytes
        for line_no, line in enumerate(f, start=1):
            try:
                total += bool(line.decode("utf-8").strip())
            except UnicodeDecodeError as e:
                raise DataError(f"{rollouts}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    totals = Totals()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as dst, tqdm(total=total, desc="replay", unit="rollout", file=sys.stderr, disable=None) as bar:
            for line_no, obj in iter_jsonl(rollouts):
                if isinstance(obj, DataError):
                    raise obj
                rollout = read_rollout(obj, table, f"{rollouts}:{line_no}")
                record = replay_rollout(rollout.response_ids, rollout.gts, table, rm)
                totals.add(record, len(rollout.gts))
                dst.write(json.dumps({"id": rollout.id, **record}, ensure_ascii=False) + "\n")
                bar.update()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return totals


# --------------------------------------------------------------------------------------- the CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.replay", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory (only its tokenizer is loaded)")
    ap.add_argument("--rollouts", required=True, type=Path, help="input JSONL: id, response_token_ids | response_text, objects (bins)")
    ap.add_argument("--out", required=True, type=Path, help="output JSONL (one line per input line, same order)")
    ap.add_argument("--config", type=Path, help="YAML with custom.extra.rollout_matching (default: the built-in defaults)")
    args = ap.parse_args(argv)
    try:
        rm = load_rollout_matching(args.config) if args.config is not None else RolloutMatchingConfig()
        check_knobs(rm, str(args.config or "defaults"))
        if not args.rollouts.is_file():
            raise ReplayError(f"--rollouts {args.rollouts}: file not found")
        args.out.parent.mkdir(parents=True, exist_ok=True)  # a new output folder is created
        table = load_token_table(args.model)
        totals = replay_file(args.rollouts, args.out, table, rm)
    except (ReplayError, ConfigError, DataError) as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    print(json.dumps(totals.summary()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
