"""Performance benchmarks of the stage-2 path, measured side by side in one run (docs/performance.md).

    python -m src.bench [--quick] [--out output/bench/results.json] [--only rollout,pipeline,lean,guard,step]
                        [--rollout-model DIR --rollout-dtype bfloat16 --rollout-new-tokens 1500 --rollout-prompts 64]
                        [--step-backend vllm]

Cases (each figure is printed with its goal and PASS / FAIL; one module each in ``src/bench/``):

1. ``rollout``  - the same 8 prompts on a tiny Qwen3-VL: batched ``HFEngine`` (decode_batch_size 8)
   vs one sample at a time (decode_batch_size 1); identical greedy outputs are required. Then the HF
   engine vs the vLLM engine on the same prompts and weights (``--rollout-*``; needs ``vllm``): tokens/s,
   engine start, weight-push time, identical outputs in float32. Runs unchanged on a GPU.
2. ``pipeline`` - parse + match + targets + supervision arrays per sample (the work of
   ``RolloutMatchingSFTTrainer.build_targets``) on synthetic dense rollouts of 10..1000 objects.
3. ``lean``     - the teacher-forced loss step (forward + backward) with logits only at supervised positions
   vs full logits, full vocabulary: peak RSS above the post-load baseline, each variant in a fresh
   subprocess; step time of both variants alternated in one subprocess with the launcher's allocator.
4. ``guard``    - recorded degenerate / clean rollouts replayed token by token through ``RowGuard``.
5. ``step``     - a tiny-model stage-2 ``trainer.train()`` split into rollout / targets / forward+backward / other
   (``--step-backend vllm``: with the vLLM engine, weight push included).

The scale path has its own benchmark (it launches ``torchrun`` itself): ``python -m src.bench.sharded
[--quick]`` — ZeRO-3 / FSDP2 rollouts with the parameters gathered once per call vs per token, and the
stage-2 step time under DDP, ZeRO-2, ZeRO-3 and FSDP2 (docs/scale.md).

Everything but the HF-vs-vLLM part of ``rollout`` runs on the CPU (a GPU is not used even when present). ``--quick`` shortens every case (see
``QUICK`` vs ``FULL``); the figures it prints say which sizes were used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from src.bench.common import Assets, Figure, machine_info, print_table
from src.bench.guard import bench_guard
from src.bench.lean import bench_lean, lean_worker
from src.bench.pipeline import bench_pipeline
from src.bench.rollout import EngineBench, bench_rollout
from src.bench.step import bench_step

CASES = ("rollout", "pipeline", "lean", "guard", "step")

FULL = {
    "rollout_new_tokens": 64, "rollout_reps": 3,
    "pipeline_sizes": {10: 60, 30: 40, 100: 20, 300: 10, 1000: 4}, "pipeline_reps": 5,
    "lean_seq": 4096, "lean_reps": 3,
    "guard_degenerate": 24, "guard_clean": 24,
    "step_steps": 6, "step_batch": 4, "step_new_tokens": 64,
}
QUICK = {
    "rollout_new_tokens": 32, "rollout_reps": 1,
    # the goal sizes keep most of the full run's samples: short bursts from other tenants of this
    # machine moved an 8-sample figure by +-20%
    "pipeline_sizes": {10: 20, 30: 12, 100: 16, 300: 8, 1000: 2}, "pipeline_reps": 5,
    "lean_seq": 1024, "lean_reps": 2,
    "guard_degenerate": 12, "guard_clean": 12,
    "step_steps": 3, "step_batch": 4, "step_new_tokens": 16,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs (smaller sizes / sequence; < 3 min on 2 CPU cores)")
    ap.add_argument("--out", type=Path, default=Path("output/bench/results.json"),
                    help="JSON with every figure and the raw measurements (default: output/bench/results.json)")
    ap.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--rollout-model", help="rollout case, HF vs vLLM: a model directory (default: a tiny demo-preset Qwen3-VL)")
    ap.add_argument("--rollout-dtype", choices=("float32", "bfloat16"), default="float32", help="rollout case, HF vs vLLM: weights dtype")
    ap.add_argument("--rollout-new-tokens", type=int, help="rollout case, HF vs vLLM: tokens per answer (default 64; --quick 32)")
    ap.add_argument("--rollout-prompts", type=int, default=8, help="rollout case, HF vs vLLM: prompts rolled out together")
    ap.add_argument("--step-backend", choices=("hf", "vllm"), default="hf", help="step case: the rollout engine")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke tests: minimal sizes, figures meaningless
    ap.add_argument("--_lean_worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._lean_worker:
        variant, model_dir, seq, reps, out = args._lean_worker
        lean_worker(model_dir, variant, int(seq), int(reps), out)
        return 0
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in only if c not in CASES]
    if bad:
        print(f"error: --only: unknown case(s) {bad}; choose from {','.join(CASES)}", file=sys.stderr)
        return 2

    import torch
    from transformers.utils import logging as hf_logging

    from src.utils.runtime import keep_freed_memory

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    malloc = keep_freed_memory()  # as the training launcher does
    torch.manual_seed(0)
    cfg = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    if args.tiny:
        cfg = {**cfg, "pipeline_sizes": {10: 2, 100: 1}, "pipeline_reps": 1, "guard_degenerate": 4, "guard_clean": 2}
        mode += " (tiny smoke)"
    engines = EngineBench(model=args.rollout_model, dtype=args.rollout_dtype, prompts=args.rollout_prompts,
                          new_tokens=args.rollout_new_tokens or cfg["rollout_new_tokens"], reps=cfg["rollout_reps"])
    machine = machine_info()
    figs: list[Figure] = []
    raw: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rmsft_bench_") as tmp:
        assets = Assets(Path(tmp))
        runners: dict[str, Callable[[], tuple[list[Figure], dict]]] = {
            "rollout": lambda: bench_rollout(assets, cfg, engines),
            "pipeline": lambda: bench_pipeline(assets, cfg),
            "lean": lambda: bench_lean(assets, cfg, Path(tmp)),
            "guard": lambda: bench_guard(assets, cfg),
            "step": lambda: bench_step(assets, cfg, Path(tmp), backend=args.step_backend),
        }
        for case in CASES:
            if case not in only:
                continue
            t0 = time.perf_counter()
            print(f"[bench] {case} ...", file=sys.stderr, flush=True)
            f, r = runners[case]()
            seconds[case] = round(time.perf_counter() - t0, 1)
            figs += f
            raw[case] = r
    total_s = round(time.perf_counter() - t_all, 1)
    print_table(figs, machine, mode)
    print(f"wall time {total_s} s ({', '.join(f'{k} {v} s' for k, v in seconds.items())})")
    result = {
        "mode": mode, "machine": machine, "keep_freed_memory": malloc, "settings": {k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()}) for k, v in cfg.items()},
        "figures": [{"case": f.case, "name": f.name, "value": f.value, "unit": f.unit, "goal": f.goal, "pass": f.passed} for f in figs],
        "cases": raw, "seconds": seconds, "wall_s": total_s,
        "passed": sum(f.passed is True for f in figs), "failed": sum(f.passed is False for f in figs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
