"""Benchmark of the scale path: sharded generation and the step time per parallel mode (docs/scale.md).

    python -m src.bench.sharded [--quick] [--out output/bench/sharded.json]

Everything runs under ``torchrun --nproc_per_node 2`` (gloo, CPU; launched by this module) on a tiny random
Qwen3-VL (``test`` preset, ~10M parameters, 152,669-token vocabulary):

1. ``generation``: the same prompts rolled out by the HF engine on a model sharded by DeepSpeed ZeRO-3
   and by FSDP2, with the parameters gathered once per engine call (``sharded_generation: gather_once``)
   and gathered per layer per token under ``synced_gpus`` (``per_token``): new tokens per second per
   rank, and the ratio of the two, measured side by side in the same run (outputs must be identical).
2. ``step``: stage-2 training (``src.sft.build_trainer``) on 2 ranks x 2 samples per step under DDP,
   ZeRO-2, ZeRO-3 and FSDP2 (``gather_once``): median seconds per optimizer step, first step excluded.

Figures depend on the machine and on other tenants of it; they are printed, never asserted. ``--quick``
uses fewer tokens, repetitions and steps (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ZERO3_INFERENCE = {  # the engine the generation case wraps the model in (no Trainer there)
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}
STEP_MODES = {  # training.* keys per mode; FSDP2 wraps the layers as configs/examples/qwen3_vl_8b_stage2_fsdp2.yaml
    # does, its other fsdp_config keys (reshard_after_forward, state_dict_type, activation_checkpointing) left
    # at their defaults: the step times in docs/scale.md were measured so
    "ddp": {},
    "zero2": {"deepspeed": str(ROOT / "configs" / "deepspeed" / "zero2.json")},
    "zero3": {"deepspeed": str(ROOT / "configs" / "deepspeed" / "zero3.json")},
    "fsdp2": {"fsdp": "full_shard auto_wrap",
              "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"]}},
}
FULL = {"gen_new_tokens": 48, "gen_prompts": 4, "gen_reps": 3, "step_steps": 8, "step_new_tokens": 32}
QUICK = {"gen_new_tokens": 16, "gen_prompts": 2, "gen_reps": 1, "step_steps": 4, "step_new_tokens": 16}


# ------------------------------------------------------------------------------ sharding a model


def init_gloo(kind: str, timeout_s: float | None = None) -> None:
    """The process group for a worker (torchrun's environment), through DeepSpeed for ZeRO-3;
    ``timeout_s``: how long a collective may wait for the other rank before it raises."""
    from datetime import timedelta

    import torch.distributed as dist

    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    if kind == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, **timeout)
    elif not dist.is_initialized():
        dist.init_process_group("gloo", **timeout)


def shard_model(model, kind: str, lr: float = 1e-4):
    """Shard a loaded Qwen-VL model as the Trainer would and return the wrapped model: a DeepSpeedEngine
    with ZeRO-3 (every parameter partitioned, torch AdamW) or the model with FSDP2 applied to each text
    decoder layer, each vision block and the root. Call :func:`init_gloo` first."""
    import torch

    if kind == "zero3":
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=lr),
                                          config=ZERO3_INFERENCE)
        return engine
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in [*model.model.language_model.layers, *model.model.visual.blocks]:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown sharding {kind!r} (zero3 | fsdp2)")


def sample_prompts(processor, n: int, size: int = 64, seed: int = 0) -> list:
    """``n`` prompt encodings of random RGB images (``size`` x ``size`` pixels)."""
    import numpy as np
    from PIL import Image

    from src.data.prompt import prompt_text
    from src.rollout.encoding import encode_prompt

    rng = np.random.default_rng(seed)
    text = prompt_text(processor)
    return [encode_prompt(processor, Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), text) for _ in range(n)]


# ------------------------------------------------------------------------------------- workers


def generation_worker(kind: str, model_dir: str, new_tokens: int, n_prompts: int, reps: int, out: str) -> None:
    """Under torchrun: roll the same prompts out with both ``sharded_generation`` modes; rank 0 writes JSON."""
    import torch.distributed as dist

    from src.models.loading import load_model_and_processor
    from src.rollout.engine import DecodeSettings
    from src.rollout.hf import HFEngine
    from src.rollout.sharded import generate_rollouts
    from src.rollout_matching.tokens import token_table

    init_gloo(kind)
    model, processor = load_model_and_processor(model_dir)
    table = token_table(processor.tokenizer)
    prompts = sample_prompts(processor, n_prompts, seed=dist.get_rank())
    engine = HFEngine(DecodeSettings(max_new_tokens=new_tokens, decode_batch_size=n_prompts), eos_id=table.im_end_id,
                      pad_id=processor.tokenizer.pad_token_id, table=table)
    wrapped = shard_model(model, kind)
    result: dict = {"kind": kind, "new_tokens": new_tokens, "prompts": n_prompts, "reps": reps}
    outputs = {}
    for mode in ("gather_once", "per_token"):
        seconds = []
        for _ in range(reps + 1):  # the first call warms up
            t0 = time.perf_counter()
            rollouts = generate_rollouts(engine, prompts, model=model, wrapped=wrapped, sharded_generation=mode)
            seconds.append(time.perf_counter() - t0)
        tokens = sum(len(r.response_ids) for r in rollouts)
        outputs[mode] = [r.response_ids for r in rollouts]
        result[mode] = {"seconds": statistics.median(seconds[1:]), "tokens": tokens,
                        "tokens_per_s": tokens / statistics.median(seconds[1:])}
    result["identical_outputs"] = outputs["gather_once"] == outputs["per_token"]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def step_worker(mode: str, model_dir: str, shapes: str, steps: int, new_tokens: int, out: str) -> None:
    """Under torchrun: stage-2 training through the launcher's ``build_trainer``; rank 0 writes JSON."""
    import torch.distributed as dist

    from src.bench.common import timed_stage2_trainer

    trainer, timer = timed_stage2_trainer({"model_name_or_path": model_dir}, Path(shapes) / "train.jsonl", Path(out).with_suffix(""),
                                          steps=steps, batch=2, rollout={"max_new_tokens": new_tokens},
                                          training={"overwrite_output_dir": True, **STEP_MODES[mode]})
    trainer.train()
    if trainer.is_world_process_zero():
        logs = [h for h in trainer.state.log_history if "rollout/new_tokens_mean" in h]
        Path(out).write_text(json.dumps({
            "mode": mode, "sharding": trainer.sharding.line(), "step_s": timer.steps,
            "new_tokens_mean": statistics.mean(h["rollout/new_tokens_mean"] for h in logs),
        }))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------ launcher


def torchrun(args: list[str], timeout: int = 900) -> None:
    """``torchrun --nproc_per_node 2 -m src.bench.sharded <args>``; raises with the tail of its output on failure."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "src.bench.sharded", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def build_assets(root: Path) -> tuple[Path, Path]:
    """A tiny Qwen3-VL (``test`` preset) and 32 shapes images, once per run."""
    from src.data.make_shapes import make_shapes
    from src.models.build_tiny import build_tiny_model_dir

    model_dir = build_tiny_model_dir(root / "tiny_qwen3_vl", "qwen3_vl", seed=0, preset="test")
    make_shapes(root / "shapes", num_train=32, num_val=2, seed=0, image_size=64, min_shapes=1, max_shapes=3)
    return model_dir, root / "shapes"


def machine() -> str:
    import torch
    import transformers

    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = "not installed"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {ds}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.bench.sharded", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens, repetitions and steps (a few minutes on 2 cores)")
    ap.add_argument("--out", type=Path, default=Path("output/bench/sharded.json"), help="JSON with every measurement")
    ap.add_argument("--_worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        kind, *rest = args._worker
        if kind == "generation":
            sharding, model_dir, new_tokens, n_prompts, reps, out = rest
            generation_worker(sharding, model_dir, int(new_tokens), int(n_prompts), int(reps), out)
        else:
            mode, model_dir, shapes, steps, new_tokens, out = rest
            step_worker(mode, model_dir, shapes, int(steps), int(new_tokens), out)
        return 0

    cfg = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    results: dict = {"mode": "quick" if args.quick else "full", "machine": machine(), "settings": cfg}
    with tempfile.TemporaryDirectory(prefix="bench_sharded_") as tmp:
        work = Path(tmp)
        model_dir, shapes = build_assets(work)
        gen = {}
        for kind in ("zero3", "fsdp2"):
            out = work / f"gen_{kind}.json"
            torchrun(["--_worker", "generation", kind, str(model_dir), str(cfg["gen_new_tokens"]), str(cfg["gen_prompts"]),
                      str(cfg["gen_reps"]), str(out)])
            gen[kind] = json.loads(out.read_text())
        steps = {}
        for mode in STEP_MODES:
            out = work / f"step_{mode}.json"
            torchrun(["--_worker", "step", mode, str(model_dir), str(shapes), str(cfg["step_steps"]), str(cfg["step_new_tokens"]), str(out)])
            steps[mode] = json.loads(out.read_text())
    results.update(generation=gen, step=steps, wall_s=round(time.perf_counter() - t_start, 1))
    print_report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    return 0


def print_report(results: dict) -> None:
    print(f"\nsrc.bench.sharded ({results['mode']}), torchrun --nproc_per_node 2, gloo; {results['machine']}")
    print("\ngeneration (new tokens/s per rank; same prompts, same outputs required)")
    print(f"  {'sharding':<8} {'gather_once':>12} {'per_token':>12} {'ratio':>7}  identical")
    for kind, g in results["generation"].items():
        once, per = g["gather_once"]["tokens_per_s"], g["per_token"]["tokens_per_s"]
        print(f"  {kind:<8} {once:>12.1f} {per:>12.1f} {once / per:>6.1f}x  {g['identical_outputs']}")
    print("\nstage-2 step (2 ranks x 2 samples, median s per optimizer step, first step excluded)")
    base = None
    for mode, s in results["step"].items():
        med = statistics.median(s["step_s"][1:] or s["step_s"])
        base = base or med
        print(f"  {mode:<6} {med:6.2f} s  ({med / base:.2f}x DDP)  {s['sharding']}")
    print(f"\nwall time {results['wall_s']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
