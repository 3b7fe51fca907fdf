"""Engine-independent pieces of the rollout package that need no vLLM: the weight export for the push
(LoRA merged, nothing touched), the response cut both engines share, the collapsed prompt vLLM expands,
and the vLLM settings checked before anything starts."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from src.config.loader import ConfigError, config_from_dict


# ----------------------------------------------------------------------------------- weight export


def test_checkpoint_tensors_are_the_state_dict_without_tied_copies(tiny_loaded):
    from src.rollout.weights import checkpoint_tensors

    model, _ = tiny_loaded["qwen2_5_vl"]
    sd = model.state_dict()
    got = dict(checkpoint_tensors(model))
    assert set(sd) - set(got) == {"lm_head.weight"}  # tied to the input embedding: pushed once
    assert all(torch.equal(sd[k], v) for k, v in got.items())


def test_lora_is_pushed_merged_and_the_training_weights_stay_untouched(tiny_model_dirs):
    """The pushed tensors equal peft's merge_and_unload of the same adapters (coord rows included), and
    the adapters / base weights being trained are bit-for-bit unchanged afterwards."""
    from src.models.loading import load_model_and_processor
    from src.rollout.weights import checkpoint_tensors

    model, _ = load_model_and_processor(tiny_model_dirs["qwen3_vl"], lora={"r": 4, "alpha": 8, "dropout": 0.0})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # trained adapters and coord rows: non-zero deltas
                p.add_(torch.randn_like(p) * 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pushed = dict(checkpoint_tensors(model))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) - set(pushed) == {"lm_head.weight"} and set(pushed) <= set(merged)
    assert all(torch.equal(merged[k], v) for k, v in pushed.items())
    coord_rows = pushed["model.language_model.embed_tokens.weight"][151669:]
    assert not torch.equal(coord_rows, before["base_model.model.model.language_model.embed_tokens.token_adapter.base_layer.weight"][151669:])


# --------------------------------------------------------------------------------- response cut


@pytest.mark.parametrize("ids, expected", [
    ([5, 6, 7, 9], ([5, 6, 7, 9], False, False)),          # ran out before the cap, no end token
    ([5, 6, 1, 8], ([5, 6, 1], False, False)),             # <|im_end|> kept, what follows dropped
    ([5, 6, 2, 2], ([5, 6], False, False)),                # <|endoftext|> dropped
    ([5, 6, 7, 8, 9, 10], ([5, 6, 7, 8, 9, 10], True, False)),  # at the cap
])
def test_finish_response_cuts_at_im_end_or_endoftext(ids, expected):
    from src.rollout.engine import finish_response

    assert finish_response(ids, eos_id=1, pad_id=2, max_new_tokens=6) == expected


def test_finish_response_replays_the_repeat_guard(token_table):
    """The token that trips the guard is the last one kept (the HF criterion stops right after it); the
    <|im_end|> the engine was made to emit after it is dropped; a trip on the last allowed token also
    counts as hitting the cap, as in the HF engine."""
    from src.rollout.engine import finish_response
    from src.rollout_matching.repeat_guard import GuardSettings, RowGuard

    settings = GuardSettings(ngram_size=1, ngram_max_repeats=3)
    a, end = token_table.encode("a")[0], token_table.im_end_id
    ids = [a, a, a, end]
    assert finish_response(ids, end, 0, 40, RowGuard(token_table, settings)) == ([a, a, a], False, True)
    assert finish_response(ids[:3], end, 0, 3, RowGuard(token_table, settings)) == ([a, a, a], True, True)
    assert finish_response(ids, end, 0, 40) == (ids, False, False)  # no guard: <|im_end|> kept


def test_collapse_image_runs_leaves_one_placeholder_per_image(tiny_loaded, sample_images):
    from src.data.prompt import prompt_text
    from src.rollout.encoding import encode_prompt
    from src.rollout.vllm import collapse_image_runs

    _, processor = tiny_loaded["qwen3_vl"]
    p = encode_prompt(processor, sample_images[0], prompt_text(processor))
    ids = collapse_image_runs(p)
    image_id = processor.image_token_id
    assert ids.count(image_id) == 1 and int((p.input_ids == image_id).sum()) > 1
    assert [t for t in ids if t != image_id] == [t for t in p.input_ids.tolist() if t != image_id]


# ---------------------------------------------------------------------------------- vLLM settings


def vllm_cfg(**rm) -> dict:
    return {"model": {"model_name_or_path": "m"}, "custom": {"train_jsonl": "t.jsonl", "extra": {"rollout_matching": {"backend": "vllm", **rm}}}}


@pytest.mark.parametrize("rm, message", [
    ({"decode_mode": "beam", "num_beams": 2}, "decode_mode: beam is not available with backend: vllm"),
    ({"max_new_tokens": 1024, "vllm": {"max_model_len": 512}}, "vllm.max_model_len: 512 leaves no room"),
    ({"vllm": {"gpu_memory_utilization": 0.0}}, "vllm.gpu_memory_utilization: must be in"),
    ({"vllm": {"tensor_parallel_size": 0}}, "vllm.tensor_parallel_size: must be >= 1"),
])
def test_vllm_settings_are_checked_at_load(rm, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(vllm_cfg(**rm))


def test_the_engine_refuses_what_the_machine_cannot_do(monkeypatch):
    """Checked when the trainer builds its engine, before training: no vllm package -> install hint; sleep
    mode without a GPU; tensor-parallel groups that do not divide the ranks."""
    import importlib.util

    import src.rollout.vllm as engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"backend: vllm needs the vllm package: pip install"):
        engine.check_machine(engine.EngineOptions())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="enable_sleep_mode: true needs a GPU"):
        engine.check_machine(engine.EngineOptions(enable_sleep_mode=True))
    monkeypatch.setattr(engine, "world", lambda: (0, 3))
    with pytest.raises(ConfigError, match="tensor_parallel_size: 2 does not divide the 3 ranks"):
        engine.check_machine(engine.EngineOptions(tensor_parallel_size=2))


# ------------------------------------------------------------------------------ ZeRO-3 weight export

ZERO3_EXPORT = '''
import sys
sys.path.insert(0, {root!r})
import deepspeed, torch, torch.distributed as dist, transformers
deepspeed.init_distributed(dist_backend="gloo")
from transformers.integrations import HfDeepSpeedConfig
from src.rollout import weights
ref = transformers.Qwen3VLForConditionalGeneration.from_pretrained({model!r})
ref_sd = {{k: v.clone() for k, v in ref.state_dict().items()}}
largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in ref.modules())
del ref
ds = HfDeepSpeedConfig({{"zero_optimization": {{"stage": 3}}, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 2}})
model = transformers.Qwen3VLForConditionalGeneration.from_pretrained({model!r})  # zero.Init: partitioned at load
assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
peak = [0]
real = deepspeed.zero.GatheredParameters
class Counting(real):
    def __init__(self, params, *a, **k):
        peak[0] = max(peak[0], sum(p.ds_numel for p in params))
        super().__init__(params, *a, **k)
deepspeed.zero.GatheredParameters = Counting
got = dict(weights.checkpoint_tensors(model))
assert set(ref_sd) - set(got) == {{"lm_head.weight"}}, set(ref_sd) ^ set(got)
assert all(torch.equal(ref_sd[k], v) for k, v in got.items())
assert peak[0] == largest, (peak[0], largest)
dist.barrier()
dist.destroy_process_group()
print("ok", dist.is_initialized())
'''


@pytest.mark.slow
def test_zero3_parameters_are_exported_one_module_at_a_time(tiny_model_dirs, tmp_path):
    """2 gloo ranks, DeepSpeed ZeRO-3 partitioning the tiny model at load: the exported tensors equal the
    plain state dict on every rank, and the largest gather is one module's parameters, never the model."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (it joins the dev extras with the DeepSpeed/FSDP work)")
    from tests.test_end_to_end import ROOT, free_port, run

    script = tmp_path / "zero3_export.py"
    script.write_text(ZERO3_EXPORT.format(root=str(ROOT), model=str(tiny_model_dirs["qwen3_vl"])))
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)])
    assert r.stdout.count("ok") == 2, r.stderr[-4000:]
