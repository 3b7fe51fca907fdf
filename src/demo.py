"""The offline demo (the README's main command): stage 1, then stage 2, on CPU, from nothing.

    python -m src.demo

1. ``configs/demo/stage1_shapes.yaml``: builds a tiny random Qwen3-VL (real Qwen vocabulary) and a
   synthetic shapes dataset under ``output/demo/``, then teaches it the detection JSON format.
2. ``configs/demo/stage2_shapes.yaml``: rollout-matching SFT from the stage-1 checkpoint.

Prints a short summary: rollout health, matches, FN appended, losses and val precision/recall/F1 of
both stages, next to a blind baseline (always predicting the median GT box) so that box quality is read
honestly: a ~10M-parameter model trained for minutes on a CPU learns the format, not good boxes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from src.config.loader import ConfigError, load_config
from src.data.contract import DataError, load_jsonl

STAGES = (("stage 1 (sft)", "configs/demo/stage1_shapes.yaml"), ("stage 2 (rollout-matching)", "configs/demo/stage2_shapes.yaml"))


def median_box_baseline(train_jsonl: str, val_jsonl: str, gate: float) -> dict[str, float]:
    """Precision/recall/F1 of a blind predictor that outputs the median training box once per image."""
    from src.data.objects import DetObject
    from src.rollout_matching.matcher import match_objects

    train, _ = load_jsonl(train_jsonl)
    boxes = [o.aabb() for r in train for o in r.objects]
    med = tuple(int(statistics.median(b[i] for b in boxes)) for i in range(4))
    val, _ = load_jsonl(val_jsonl)
    pred = [DetObject("object", "bbox_2d", med)]
    matched = sum(len(match_objects(pred, r.objects, maskiou_gate=gate).matches) for r in val)
    p, r = matched / max(len(val), 1), matched / max(sum(len(v.objects) for v in val), 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--stage1-only", action="store_true", help="run stage 1 only")
    args = ap.parse_args(argv)
    from src.sft import run
    from src.utils.runtime import keep_freed_memory

    keep_freed_memory()

    t0 = time.time()
    results = []
    for name, path in STAGES[: 1 if args.stage1_only else 2]:
        if not Path(path).exists():
            print(f"[demo] {path} not found; skipping {name}", flush=True)
            continue
        try:
            cfg = load_config(path)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"\n[demo] ===== {name}: python -m src.sft --config {path}", flush=True)
        try:
            results.append((name, cfg, run(cfg)))
        except (ConfigError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    cfg0 = results[0][1]
    base = median_box_baseline(cfg0.custom.train_jsonl, cfg0.custom.val_jsonl, cfg0.rollout_matching.maskiou_gate)
    print("\n[demo] ===== summary (val split, greedy rollouts, match = maskIoU >= gate)")
    print(f"{'':28s} {'valid JSON':>10s} {'objs/img':>9s} {'precision':>9s} {'recall':>7s} {'F1':>6s} {'loss first->last':>18s} {'wall':>6s}")
    for name, _, s in results:
        print(f"{name:28s} {s.get('eval_rollout_parse_valid_rate', 0):10.2f} {s.get('eval_rollout_valid_objects_per_image', 0):9.2f} "
              f"{s.get('eval_rollout_precision', 0):9.3f} {s.get('eval_rollout_recall', 0):7.3f} {s.get('eval_rollout_f1', 0):6.3f} "
              f"{s.get('loss_first', 0):8.3f} -> {s.get('loss_last', 0):6.3f} {s.get('wall_s', 0):5.0f}s")
    print(f"{'blind median-box baseline':28s} {'':10s} {1.0:9.2f} {base['precision']:9.3f} {base['recall']:7.3f} {base['f1']:6.3f}")
    for name, cfg, s in results:
        if cfg.custom.trainer_variant == "rollout_matching_sft":
            keys = ("total_rollout/samples", "total_rollout/valid_pred_objects", "total_rollout/matched_for_supervision",
                    "total_rollout/fn_appended", "total_rollout/gating_rejections", "last_loss/ce", "last_loss/coord")
            print(f"{name} over the run: " + ", ".join(f"{k.split('_', 1)[1]}={s.get(k, 0):.4g}" for k in keys))
    print(f"[demo] total wall time {time.time() - t0:.0f}s; run directories: " + ", ".join(c.training.args["output_dir"] for _, c, _ in results))
    Path("output/demo").mkdir(parents=True, exist_ok=True)
    Path("output/demo/summary.json").write_text(json.dumps({n: s for n, _, s in results} | {"baseline": base}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
