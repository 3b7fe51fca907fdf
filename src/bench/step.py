"""Case ``step``: a tiny-model stage-2 ``trainer.train()`` split into rollout / targets / forward+backward /
other."""

from __future__ import annotations

from pathlib import Path

from src.bench.common import Assets, Figure, timed_stage2_trainer


def bench_step(assets: Assets, cfg: dict, workdir: Path, backend: str = "hf") -> tuple[list[Figure], dict]:
    """``backend: vllm`` runs the tiny demo-preset model (vLLM's CPU attention needs head_dim 32) in float32,
    and the rollout time includes the weight push (reported on its own as well)."""
    steps, bs, n_new = cfg["step_steps"], cfg["step_batch"], cfg["step_new_tokens"]
    rm = {"max_new_tokens": n_new}
    model = {"model_name_or_path": str(assets.model_dir)}
    if backend == "vllm":
        rm.update(backend="vllm", vllm={"dtype": "float32"})
        model = {"model_name_or_path": str(assets.demo_model_dir()), "dtype": "float32"}
    trainer, timer = timed_stage2_trainer(model, assets.shapes / "train.jsonl", workdir / "step_run", steps=steps, batch=bs, rollout=rm)
    try:
        trainer.train()
    finally:
        trainer.rollout_engine.close()
    logs = [h for h in trainer.state.log_history if "time/rollout_ms_per_sample" in h]
    use = logs[1:] if len(logs) > 1 else logs  # the first step warms up
    step_s = timer.steps[1:] if len(timer.steps) > 1 else timer.steps
    mean = lambda k: sum(h[k] for h in use) / len(use)  # noqa: E731
    ro, tg, fb = mean("time/rollout_ms_per_sample") * bs, mean("time/targets_ms_per_sample") * bs, mean("time/forward_backward_ms_per_sample") * bs
    total = 1e3 * sum(step_s) / len(step_s)
    # on_step_begin..on_step_end holds the micro-step (fetching the batch precedes on_step_begin): "other"
    # is the optimizer step, clipping, scheduler and logging
    other = max(total - ro - tg - fb, 0.0)
    new_tok = sum(h.get("rollout/new_tokens_mean", 0.0) for h in use) / len(use)
    frac = tg / total
    push = 1e3 * mean("time/weight_push_s")
    figs = [
        Figure("step", f"step time ({backend}, bs {bs}, {new_tok:.0f} new tokens/rollout, mean of {len(step_s)} steps)", total, "ms"),
        Figure("step", "rollout" + (f" (incl. weight push {push:.0f} ms)" if backend == "vllm" else ""), ro, "ms", f"{100 * ro / total:.0f}% of step"),
        Figure("step", "parse+match+targets+batch", tg, "ms", f"{100 * tg / total:.1f}% of step"),
        Figure("step", "forward+backward", fb, "ms", f"{100 * fb / total:.0f}% of step"),
        Figure("step", "other (optimizer, logging)", other, "ms", f"{100 * other / total:.0f}% of step"),
        Figure("step", "non-model pipeline share", 100 * frac, "%", "<= 5%", frac <= 0.05),
    ]
    raw = {"backend": backend, "weight_push_ms": push, "batch": bs, "max_new_tokens": n_new, "steps": steps, "steps_used": len(step_s), "step_ms": total,
           "rollout_ms": ro, "targets_ms": tg, "forward_backward_ms": fb, "other_ms": other, "pipeline_fraction": frac,
           "new_tokens_mean": new_tok, "step_s_all": timer.steps}
    return figs, raw
