"""Case ``rollout``: how fast rollouts are produced.

1. HF batching (tiny ``test``-preset Qwen3-VL, CPU): the same 8 prompts through ``HFEngine`` with
   decode_batch_size 8 vs 1; identical greedy outputs required, batched >= 4x faster.
2. HF vs vLLM (``--rollout-model``, default: a tiny ``demo``-preset Qwen3-VL): the same prompts through
   the batched ``HFEngine`` and the ``VLLMEngine`` on the same weights, every answer forced to the same
   length (``--rollout-new-tokens``: no early stop, both engines do the same work); tokens/s of each,
   engine start, weight-push time (mean of several pushes) and, in float32, identical greedy outputs.
   On a GPU the same command runs unchanged with the CUDA ``vllm`` package, e.g.
   ``--rollout-model /ckpt/Qwen3-VL-4B --rollout-dtype bfloat16 --rollout-new-tokens 1500 --rollout-prompts 64``
   (bfloat16 outputs are close, not equal: the identity figure is then informational).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from src.bench.common import Assets, Figure, median


@dataclass(frozen=True)
class EngineBench:
    """Options of the HF-vs-vLLM part (command line ``--rollout-*``)."""

    model: str | None = None      # a model directory; None = the tiny demo-preset Qwen3-VL
    dtype: str = "float32"
    new_tokens: int = 64
    prompts: int = 8
    pushes: int = 3
    reps: int = 3


def bench_batching(assets: Assets, cfg: dict) -> tuple[list[Figure], dict]:
    """Batched ``HFEngine`` (decode_batch_size 8) vs one sample at a time on the same 8 prompts."""
    import torch

    from src.models.loading import load_model_and_processor
    from src.rollout.engine import DecodeSettings
    from src.rollout.hf import HFEngine

    model, processor = load_model_and_processor(assets.model_dir)
    model.eval()
    table = assets.table
    prompts = _prompts(assets, processor, 8)
    n_new = cfg["rollout_new_tokens"]

    def backend(bs: int, max_new: int) -> HFEngine:
        b = HFEngine(DecodeSettings(decode_mode="greedy", max_new_tokens=max_new, decode_batch_size=bs),
                             eos_id=table.im_end_id, pad_id=processor.tokenizer.pad_token_id)
        b.generation_config.min_new_tokens = max_new  # a fixed length: both variants do the same work
        return b

    batched, single = backend(8, n_new), backend(1, n_new)
    backend(8, 4).generate(model, prompts)  # warm-up (kernels, allocator) for both paths
    backend(1, 4).generate(model, prompts[:2])
    times: dict[str, list[float]] = {"batched": [], "single": []}
    outs: dict[str, list[list[int]]] = {}
    for _ in range(cfg["rollout_reps"]):  # interleaved so drift hits both
        for name, b in (("batched", batched), ("single", single)):
            t0 = time.perf_counter()
            ro = b.generate(model, prompts)
            times[name].append(time.perf_counter() - t0)
            outs[name] = [r.response_ids for r in ro]
    identical = outs["batched"] == outs["single"]
    if not identical:
        diff = sum(a != b for a, b in zip(outs["batched"], outs["single"]))
        print(f"rollout: batched and single greedy outputs differ in {diff}/8 samples", file=sys.stderr)
    tokens = sum(len(r) for r in outs["batched"])
    tb, ts = median(times["batched"]), median(times["single"])
    speedup = ts / tb
    del model
    torch.set_grad_enabled(True)
    figs = [
        Figure("rollout", "identical greedy outputs (8 samples)", "yes" if identical else "NO", "", "required", identical),
        Figure("rollout", f"batched (bs 8): {tokens} new tokens", tokens / tb, "tok/s"),
        Figure("rollout", "one at a time (bs 1)", tokens / ts, "tok/s"),
        Figure("rollout", f"speed-up batched vs bs 1 ({n_new} new tokens)", speedup, "x", ">= 4x", speedup >= 4.0),
    ]
    raw = {"new_tokens_per_sample": n_new, "total_new_tokens": tokens, "seconds": times, "speedup": speedup,
           "tokens_per_s": {"batched": tokens / tb, "single": tokens / ts}, "identical": identical,
           "prompt_tokens": [int(p.input_ids.numel()) for p in prompts]}
    return figs, raw


def _prompts(assets: Assets, processor, n: int) -> list:
    """``n`` prompts from the shapes images (cycled), encoded like training."""
    from src.data.contract import load_jsonl
    from src.data.images import load_image
    from src.data.prompt import prompt_text
    from src.rollout.encoding import encode_prompt

    records = load_jsonl(assets.shapes / "train.jsonl")[0]
    prompt = prompt_text(processor)
    return [encode_prompt(processor, load_image(r.image, r.source), prompt) for r in (records * (n // len(records) + 1))[:n]]


def bench_engines(assets: Assets, opts: EngineBench) -> tuple[list[Figure], dict]:
    """HF batched generate vs the vLLM engine on the same prompts and weights (see the module docstring)."""
    if importlib.util.find_spec("vllm") is None:
        return [Figure("rollout", "HF vs vLLM: vllm not installed (README: install routes)", "skipped")], {"vllm": "not installed"}
    import torch

    from src.models.loading import load_model_and_processor
    from src.rollout.engine import DecodeSettings
    from src.rollout.hf import HFEngine
    from src.rollout.vllm import EngineOptions, VLLMEngine
    from src.rollout_matching.tokens import token_table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = Path(opts.model) if opts.model else assets.demo_model_dir()
    model, processor = load_model_and_processor(model_dir, dtype=opts.dtype)
    model = model.to(device).eval()
    table = token_table(processor.tokenizer)
    pad = processor.tokenizer.pad_token_id
    prompts = _prompts(assets, processor, opts.prompts)
    n = opts.new_tokens
    settings = DecodeSettings(max_new_tokens=n, decode_batch_size=opts.prompts)
    hf = HFEngine(settings, eos_id=table.im_end_id, pad_id=pad)
    hf.generation_config.min_new_tokens = n  # a fixed length: both engines do the same work
    engine = VLLMEngine(settings, EngineOptions(dtype=opts.dtype), table.im_end_id, pad, table=table, processor=processor)
    engine.min_new_tokens = n
    times: dict[str, list[float]] = {"hf": [], "vllm": []}
    outs: dict[str, list] = {}
    try:
        engine.generate(model, prompts[:1])  # start, first push, warm-up
        hf.generate(model, prompts[:1])
        for _ in range(opts.reps):  # interleaved so drift hits both
            for name, eng in (("vllm", engine), ("hf", hf)):
                t0 = time.perf_counter()
                outs[name] = eng.generate(model, prompts)
                times[name].append(time.perf_counter() - t0)
        push = [engine.push_weights(model) for _ in range(opts.pushes)]
        start_s = engine.start_s
    finally:
        engine.close()
    v_s, h_s = median(times["vllm"]), median(times["hf"])
    v, h = outs["vllm"], outs["hf"]
    identical = [r.response_ids for r in v] == [r.response_ids for r in h]
    tokens = sum(len(r.response_ids) for r in h)
    v_tokens = sum(len(r.response_ids) for r in v)
    exact = opts.dtype == "float32"
    where = f"{device}, {opts.dtype}, {len(prompts)} prompts x {n} new tokens, median of {opts.reps}"
    figs = [
        Figure("rollout", f"HF vs vLLM identical greedy outputs ({where})", "yes" if identical else "NO", "",
               "required in float32" if exact else "informational (bf16: close, not equal)", identical if exact else None),
        Figure("rollout", "HF engine (batched generate)", tokens / h_s, "tok/s"),
        Figure("rollout", "vLLM engine", v_tokens / v_s, "tok/s"),
        Figure("rollout", "speed-up vLLM vs HF", (v_tokens / v_s) / (tokens / h_s), "x"),
        Figure("rollout", "vLLM engine start (build, before the first push)", start_s, "s"),
        Figure("rollout", f"weight push (median of {len(push)})", median(push), "s"),
    ]
    raw = {"model": str(model_dir), "device": device, "dtype": opts.dtype, "prompts": len(prompts), "new_tokens": n,
           "hf_s": h_s, "vllm_s": v_s, "seconds": times, "hf_tokens": tokens, "vllm_tokens": v_tokens, "tokens_per_s": {"hf": tokens / h_s, "vllm": v_tokens / v_s},
           "identical": identical, "engine_start_s": start_s, "push_s": push,
           "parameters": sum(p.numel() for p in model.parameters())}
    return figs, raw


def bench_rollout(assets: Assets, cfg: dict, engines: EngineBench) -> tuple[list[Figure], dict]:
    figs, raw = bench_batching(assets, cfg)
    efigs, eraw = bench_engines(assets, engines)
    return figs + efigs, {**raw, "engines": eraw}
