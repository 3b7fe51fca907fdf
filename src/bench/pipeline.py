"""Case ``pipeline``: parse + match + targets + supervision arrays per sample (the work of
``RolloutMatchingSFTTrainer.build_targets``) on synthetic dense rollouts of 10..1000 objects."""

from __future__ import annotations

import random
import time
from typing import Any

from src.bench.common import Assets, Figure, dense_sample


def pipeline_one(ids: list[int], gts: list, table, rm, mk: dict) -> tuple[float, float, float, float]:
    """parse, match, targets, supervision arrays of one sample: seconds of each stage."""
    from src.rollout_matching.matcher import match_objects
    from src.rollout_matching.parser import parse_rollout
    from src.rollout_matching.targets import build_train_target

    t0 = time.perf_counter()
    parsed = parse_rollout(ids, table)
    t1 = time.perf_counter()
    match = match_objects([o.to_det_object() for o in parsed.objects], gts, **mk)
    t2 = time.perf_counter()
    target = build_train_target(parsed, gts, match, table, ot_cost=rm.ot_cost, ot_epsilon=rm.ot_epsilon, ot_iters=rm.ot_iters,
                                supervise_eos=rm.supervise_eos, fn_ordering="sorted")
    t3 = time.perf_counter()
    target.supervision_arrays()
    t4 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, t4 - t3


def median_run(ids: list[int], gts: list, table, rm, mk: dict, reps: int) -> tuple[float, float, float, float]:
    """The stage times of the median (by total) of ``reps`` runs of :func:`pipeline_one` on one sample."""
    return sorted((pipeline_one(ids, gts, table, rm, mk) for _ in range(reps)), key=sum)[reps // 2]


def bench_pipeline(assets: Assets, cfg: dict) -> tuple[list[Figure], dict]:
    from src.config.schema import RolloutMatchingConfig
    from src.rollout_matching.stats import match_kwargs

    table = assets.table
    rm = RolloutMatchingConfig()
    mk = match_kwargs(rm)
    reps = cfg["pipeline_reps"]
    raw: dict[str, Any] = {"settings": {**mk, "ot_cost": rm.ot_cost, "ot_epsilon": rm.ot_epsilon, "ot_iters": rm.ot_iters}, "sizes": {}}
    figs: list[Figure] = []
    for n, count in cfg["pipeline_sizes"].items():
        rng = random.Random(n)
        samples = [dense_sample(n, rng, table) for _ in range(count)]
        pipeline_one(*samples[0], table, rm, mk)  # warm-up
        per_stage = [[], [], [], []]
        totals = []
        for ids, gts in samples:
            run = median_run(ids, gts, table, rm, mk, reps)
            for s in range(4):
                per_stage[s].append(run[s])
            totals.append(sum(run))
        mean_ms = 1e3 * sum(totals) / count
        stages = {name: round(1e3 * sum(v) / count, 3) for name, v in zip(("parse", "match", "targets", "arrays"), per_stage)}
        tokens = sum(len(ids) for ids, _ in samples) / count
        raw["sizes"][str(n)] = {"samples": count, "reps": reps, "ms_per_sample": round(mean_ms, 3), "ms_per_object": round(mean_ms / n, 4),
                                "stages_ms": stages, "response_tokens_mean": round(tokens, 1),
                                "p90_ms": round(1e3 * sorted(totals)[int(0.9 * (count - 1))], 3)}
        goal = {100: 15.0, 300: 50.0}.get(n)
        stage_txt = " / ".join(f"{k} {v:.1f}" for k, v in stages.items())
        figs.append(Figure("pipeline", f"{n} objects ({tokens:,.0f} tok; {stage_txt} ms)", mean_ms, "ms",
                           f"<= {goal:g} ms" if goal else "", (mean_ms <= goal) if goal else None))
    # Boxes only (COCO / LVIS bbox annotations): box-box maskIoU needs no rasterisation (informational).
    raw["boxes_only"] = {}
    for n in (100, 300):
        count = cfg["pipeline_sizes"].get(n)
        if not count:
            continue
        rng = random.Random(n + 1)
        samples = [dense_sample(n, rng, table, poly_frac=0.0) for _ in range(count)]
        pipeline_one(*samples[0], table, rm, mk)  # warm-up
        totals, matches = [], []
        for ids, gts in samples:
            run = median_run(ids, gts, table, rm, mk, reps)
            totals.append(sum(run))
            matches.append(run[1])
        mean_ms, match_ms = 1e3 * sum(totals) / count, 1e3 * sum(matches) / count
        raw["boxes_only"][str(n)] = {"samples": count, "ms_per_sample": round(mean_ms, 3), "match_ms": round(match_ms, 3)}
        figs.append(Figure("pipeline", f"{n} objects, boxes only (match {match_ms:.1f} ms)", mean_ms, "ms"))
    per_obj = {n: raw["sizes"][str(n)]["ms_per_object"] for n in cfg["pipeline_sizes"]}
    curve = ", ".join(f"{n}: {v:.3f}" for n, v in per_obj.items())
    hi = max(per_obj)  # the largest size measured
    growth = per_obj[hi] / per_obj[100] if 100 in per_obj else float("nan")
    figs.append(Figure("pipeline", f"ms/object ({curve})", growth, "x", f"near-linear: ms/obj at {hi} <= 2x at 100", growth <= 2.0))
    raw["ms_per_object"] = per_obj
    return figs, raw
