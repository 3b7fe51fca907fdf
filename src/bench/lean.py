"""Case ``lean``: the teacher-forced loss step (forward + backward) with logits only at supervised positions
vs full logits, full vocabulary: peak RSS above the post-load baseline, each variant in a fresh subprocess
(``python -m src.bench --_lean_worker ...``); step time of both variants alternated in one subprocess with
the launcher's allocator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from src.bench.common import Assets, Figure, median

SUPERVISED_FRACTION = 0.2


def _rss_kb() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return int(next(ln for ln in f if ln.startswith("VmRSS")).split()[1])


def _hwm_kb() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return int(next(ln for ln in f if ln.startswith("VmHWM")).split()[1])


def _reset_hwm() -> bool:
    """Reset the process' peak RSS (VmHWM) to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def lean_worker(model_dir: str, variant: str, seq: int, reps: int, out: str) -> None:
    """One variant in a fresh process: loss step (forward + backward), peak RSS above the post-load level."""
    import resource

    import torch

    from src.losses.supervised import teacher_forced_losses
    from src.models.selective import selected_logits
    from src.models.loading import load_model_and_processor

    torch.manual_seed(0)
    model, processor = load_model_and_processor(model_dir)
    model.train()
    tok = processor.tokenizer
    coord_ids = torch.as_tensor(tok.convert_tokens_to_ids([f"<|coord_{k}|>" for k in range(1000)]), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    V = len(tok)

    def make_inputs(seq: int) -> dict:
        input_ids = torch.randint(0, 151643, (1, seq), generator=g)
        mask = torch.zeros((1, seq), dtype=torch.bool)
        mask[0, torch.randperm(seq - 1, generator=g)[: int(SUPERVISED_FRACTION * seq)]] = True
        n = int(mask.sum())
        is_coord = torch.rand(n, generator=g) < 0.4
        return {
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": torch.zeros_like(input_ids),
            "mask": mask, "ce": torch.where(is_coord, torch.full((n,), -100), torch.randint(0, V, (n,), generator=g)),
            "bins": torch.where(is_coord, torch.randint(0, 1000, (n,), generator=g), torch.full((n,), -1)),
            "seg": torch.randint(0, 2, (n,), generator=g), "sample_idx": torch.zeros(n, dtype=torch.long),
        }

    def forward_loss(x: dict, variant: str):
        """As ``DetectionTrainer.supervised_forward``: the model output is dropped when this returns
        (before backward), so the full variant's [T, V] logits do not outlive the loss."""
        inputs = {k: x[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if variant == "lean":
            logits = selected_logits(model, inputs, x["mask"], use_cache=False)
        else:
            out = model(**inputs, logits_to_keep=0, use_cache=False)
            logits = out.logits[x["mask"]]  # [N, V]: the same rows in the same order
        return teacher_forced_losses(logits, x["ce"], x["bins"], x["seg"], x["sample_idx"], 1, coord_ids).loss, int(logits.shape[0])

    def step(x: dict, variant: str = variant) -> tuple[float, int]:
        model.zero_grad(set_to_none=True)
        loss, rows = forward_loss(x, variant)
        loss.backward()
        return float(loss.detach()), rows

    if variant == "both":
        # Timing: both variants in one process with the launcher's allocator setting, warmed up, then
        # alternated so that both see the same allocator and machine state.
        from src.utils.runtime import keep_freed_memory

        keep_freed_memory()
        x = make_inputs(seq)
        step(x, "lean"), step(x, "full")
        times = {"lean": [], "full": []}
        for _ in range(reps):
            for v in ("lean", "full"):
                t0 = time.perf_counter()
                step(x, v)
                times[v].append(time.perf_counter() - t0)
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"variant": "both", "seq": seq, "step_s": times}, f)
        return

    # Memory: one variant per fresh process, default allocator, one step after a small warm-up.
    step(make_inputs(64))  # warm-up: lazy one-time allocations (autograd engine, kernels) stay out of the peak
    model.zero_grad(set_to_none=True)
    x = make_inputs(seq)
    base_rss = _rss_kb()
    reset = _reset_hwm()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss, rows = step(x)
    first_s = time.perf_counter() - t0
    peak_kb = _hwm_kb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss, "grads": grads}, out + ".pt")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"variant": variant, "seq": seq, "supervised_rows": rows, "vocab": V, "loss": loss,
                   "peak_above_baseline_mb": (peak_kb - base_rss) / 1024, "baseline_rss_mb": base_rss / 1024,
                   "peak_method": "VmHWM after clear_refs reset" if reset else "ru_maxrss",
                   "maxrss_before_mb": maxrss_before / 1024, "first_step_s": first_s}, f)


def bench_lean(assets: Assets, cfg: dict, workdir: Path) -> tuple[list[Figure], dict]:
    import torch

    seq, reps = cfg["lean_seq"], cfg["lean_reps"]
    res = {}
    for variant in ("lean", "full", "both"):
        out = workdir / f"lean_{variant}.json"
        env = {**os.environ, "RMSFT_DEFAULT_MALLOC": "1"}
        cmd = [sys.executable, "-m", "src.bench", "--_lean_worker", variant, str(assets.model_dir), str(seq), str(reps), str(out)]
        subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[2])
        res[variant] = json.loads(out.read_text())
        if variant != "both":
            res[variant]["_pt"] = str(out) + ".pt"
    timing = res.pop("both")["step_s"]
    a, b = torch.load(res["lean"].pop("_pt")), torch.load(res["full"].pop("_pt"))
    loss_diff = abs(a["loss"] - b["loss"])
    grad_diff = max(float((a["grads"][k] - b["grads"][k]).abs().max()) for k in a["grads"])
    grad_scale = max(float(b["grads"][k].abs().max()) for k in b["grads"])
    same_keys = set(a["grads"]) == set(b["grads"])
    mem_ratio = res["full"]["peak_above_baseline_mb"] / max(res["lean"]["peak_above_baseline_mb"], 1e-9)
    tl, tf = median(timing["lean"]), median(timing["full"])
    res["lean"]["step_s"], res["full"]["step_s"] = timing["lean"], timing["full"]
    close = same_keys and loss_diff <= 1e-4 and grad_diff <= 1e-5 * max(1.0, grad_scale) + 1e-6
    n_sup = res["lean"]["supervised_rows"]
    figs = [
        Figure("lean", f"peak RSS full logits (seq {seq}, {n_sup} supervised, V {res['lean']['vocab']:,})",
               res["full"]["peak_above_baseline_mb"], "MB"),
        Figure("lean", "peak RSS supervised-only logits", res["lean"]["peak_above_baseline_mb"], "MB"),
        Figure("lean", "peak memory full / lean", mem_ratio, "x", ">= 3x", mem_ratio >= 3.0),
        Figure("lean", f"step time lean {tl * 1e3:,.0f} ms vs full {tf * 1e3:,.0f} ms", tf / tl, "x faster", ">= 1x (no slower)", tl <= tf),
        Figure("lean", f"identical loss/grads (|dloss| {loss_diff:.1e}, max|dgrad| {grad_diff:.1e})", "yes" if close else "NO",
               "", "fp tolerance", close),
    ]
    raw = {"seq": seq, "supervised_fraction": SUPERVISED_FRACTION, **res, "loss_abs_diff": loss_diff,
           "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale, "memory_ratio": mem_ratio, "time_ratio_full_over_lean": tf / tl}
    return figs, raw
