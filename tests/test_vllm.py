"""The vLLM engine (``backend: vllm``) against the HF engine on tiny float32 Qwen3-VL and Qwen2.5-VL models.

Needs the ``vllm`` package (CI installs the CPU route and runs these; elsewhere they are skipped when it is
missing). One engine per architecture serves the whole session (starting one takes ~40 s on a CPU), inside a
stage-2 trainer built by the launcher's own ``build_trainer``; the command-line runs start their own.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from src.config.loader import config_from_dict, merge
from src.data.contract import load_jsonl
from tests.test_end_to_end import ROOT, free_port, run, train_logs

ARCHS = ("qwen3_vl", "qwen2_5_vl")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("vllm_installed")]


def vllm_cfg(model_dir: Path, shapes: Path, out: Path, **over):
    base = {
        "model": {"model_name_or_path": str(model_dir), "dtype": "float32"},
        "custom": {"trainer_variant": "rollout_matching_sft", "train_jsonl": str(shapes / "train.jsonl"), "val_jsonl": str(shapes / "val.jsonl"),
                   "extra": {"rollout_matching": {"backend": "vllm", "max_new_tokens": 16, "decode_batch_size": 4, "log_rollout_samples": 4,
                                                  "vllm": {"dtype": "float32", "max_model_len": 512}}}},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 2, "max_steps": 1, "learning_rate": 1e-2, "logging_steps": 1,
                     "save_strategy": "no", "report_to": [], "seed": 0, "disable_tqdm": True},
    }
    return config_from_dict(merge(base, over))


@pytest.fixture(scope="session", params=ARCHS)
def vllm_trainer(request, demo_model_dirs, shapes_dir, tmp_path_factory):
    """A stage-2 trainer with backend: vllm; its engine starts at the first rollout and lives for the session
    (one architecture at a time: pytest finishes one parameter before starting the next)."""
    from src.sft import build_trainer

    trainer = build_trainer(vllm_cfg(demo_model_dirs[request.param], shapes_dir, tmp_path_factory.mktemp(f"vllm_{request.param}")))
    yield trainer
    trainer.rollout_engine.close()


def reference_engine(trainer, **changes):
    """The HF engine with the vLLM engine's decoding (and repeat guard)."""
    from src.rollout.hf import HFEngine

    s = replace(trainer.rollout_engine.settings, **changes)
    return HFEngine(s, eos_id=trainer.table.im_end_id, pad_id=trainer.processor.tokenizer.pad_token_id, table=trainer.table,
                    guard=trainer.rollout_engine.guard)


def text_prompt(processor):
    """A prompt without an image."""
    from src.rollout.encoding import PromptEncoding

    ids = torch.tensor(processor.tokenizer("<|im_start|>user\nList the shapes.<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    return PromptEncoding(ids, torch.zeros_like(ids), torch.zeros(0, 1), torch.zeros(0, 3, dtype=torch.long))


def parity_prompts(trainer, shapes: Path, images) -> list:
    """Two shapes images (64 px), two images of other sizes (128x128, 200x96) and a text-only prompt."""
    from src.data.prompt import prompt_text
    from src.rollout.encoding import encode_prompt

    recs = load_jsonl(shapes / "val.jsonl")[0][:2]
    batch = trainer.data_collator([{"record": r, "index": i} for i, r in enumerate(recs)])
    prompt = prompt_text(trainer.processor)
    return [*batch["prompts"], *(encode_prompt(trainer.processor, im, prompt) for im in images), text_prompt(trainer.processor)]


def assert_same_rollouts(vllm_rollouts, hf_rollouts, prompts) -> None:
    """Same response ids and stop flags; both engines consumed exactly the prompt ids and pixels given."""
    from src.rollout.encoding import NO_IMAGE_DIGEST, image_digests

    for i, (v, h, p) in enumerate(zip(vllm_rollouts, hf_rollouts, prompts, strict=True)):
        assert v.response_ids == h.response_ids, f"prompt {i}"
        assert (v.hit_max_new_tokens, v.stopped_by_guard) == (h.hit_max_new_tokens, h.stopped_by_guard), f"prompt {i}"
        assert list(v.consumed_prompt_ids) == p.input_ids.tolist() == list(h.consumed_prompt_ids)
        pixels = image_digests(p.pixel_values, p.image_grid_thw)[0] if p.image_grid_thw.numel() else NO_IMAGE_DIGEST
        assert v.consumed_image_digest == pixels == h.consumed_image_digest


# ----------------------------------------------------------------------------------------- parity


def test_greedy_rollouts_equal_the_hf_engine_before_and_after_a_training_step(vllm_trainer, shapes_dir, sample_images):
    """fp32 greedy: vLLM == HF generate token for token (image and text prompts), on the initial weights and
    after one optimizer step of the real training loop, which pushes the new weights exactly once; held
    back, the engine still answers with the old policy."""
    tr, engine = vllm_trainer, vllm_trainer.rollout_engine
    model = tr.rollout_model()
    prompts = parity_prompts(tr, shapes_dir, sample_images)
    hf = reference_engine(tr)
    before = engine.generate(model, prompts)
    assert_same_rollouts(before, hf.generate(model, prompts), prompts)
    assert len({tuple(r.response_ids) for r in before}) == len(prompts)  # five different answers: not a vacuous comparison
    assert sum(len(set(r.response_ids)) > 3 for r in before) >= 3

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr.train()  # one optimizer step; the trainer marks the engine stale after it
    assert any(not torch.equal(weights[n], p) for n, p in model.named_parameters())
    assert engine.stale
    engine.stale = False  # held back: the engine still has the previous weights
    held_back = engine.generate(model, prompts)
    assert [r.response_ids for r in held_back] == [r.response_ids for r in before]

    engine.mark_stale()
    after = engine.generate(model, prompts)
    assert engine.last_stats["weight_pushes"] == 1 and engine.last_stats["weight_push_s"] > 0
    reference = hf.generate(model, prompts)
    assert_same_rollouts(after, reference, prompts)
    assert [r.response_ids for r in after] != [r.response_ids for r in before]  # the step changed the policy
    engine.generate(model, prompts)
    assert engine.last_stats["weight_pushes"] == 0  # nothing changed since: no push


def test_repeat_guard_stops_vllm_rollouts_where_the_hf_engine_stops(vllm_trainer, shapes_dir, sample_images, monkeypatch):
    """The guard ends vLLM requests early (a forced <|im_end|> right after the tripping token) and the
    rollouts, stop flags and the trainer's counter equal the HF engine's."""
    from src.rollout_matching.repeat_guard import GuardSettings

    tr, engine = vllm_trainer, vllm_trainer.rollout_engine
    engine.mark_stale()  # whatever ran before, roll out this trainer's weights
    monkeypatch.setattr(engine, "guard", GuardSettings(ngram_size=1, ngram_max_repeats=2))
    monkeypatch.setattr(engine, "settings", replace(engine.settings, max_new_tokens=48))
    prompts = parity_prompts(tr, shapes_dir, sample_images)
    model = tr.rollout_model()
    ours = engine.generate(model, prompts)
    assert_same_rollouts(ours, reference_engine(tr, max_new_tokens=48).generate(model, prompts), prompts)
    stopped = [r for r in ours if r.stopped_by_guard]
    assert stopped, "the guard settings should stop some of these rollouts"
    # vLLM generated only up to the forced end token of each guarded request, not to the cap
    assert engine.last_stats["engine_tokens"] <= sum(len(r.response_ids) for r in ours) + len(stopped)

    inputs = tr.data_collator([{"record": r, "index": i} for i, r in enumerate(load_jsonl(shapes_dir / "train.jsonl")[0][:2])])
    tr.step_metrics.reduce()  # start from zero
    tr.model.train()
    tr.compute_loss(tr.model, inputs)
    counted = tr.step_metrics.reduce()["rollout/repeat_guard_stops"]
    hf = reference_engine(tr, max_new_tokens=48).generate(model, inputs["prompts"])
    assert counted == sum(r.stopped_by_guard for r in hf)


# ------------------------------------------------------------------------------- prompt checks


def test_ids_or_pixels_the_engine_consumed_differently_stop_training(vllm_trainer, shapes_dir, monkeypatch):
    """An engine made to consume other prompt ids (one token swapped before it reaches vLLM), or another
    image (mirrored), reports what it really consumed, and the trainer refuses to train on it."""
    from PIL import Image

    import src.rollout.vllm as engine_module
    from src.trainers.rollout_matching import PromptMismatchError

    tr = vllm_trainer
    tr.rollout_engine.mark_stale()
    recs = load_jsonl(shapes_dir / "train.jsonl")[0][:2]
    inputs = tr.data_collator([{"record": r, "index": i} for i, r in enumerate(recs)])
    tr.model.train()
    collapse = engine_module.collapse_image_runs

    def swap_one(prompt):
        ids = collapse(prompt)
        return [*ids[:3], ids[3] + 1, *ids[4:]]

    with monkeypatch.context() as m:
        m.setattr(engine_module, "collapse_image_runs", swap_one)
        with pytest.raises(PromptMismatchError, match="sample 0: teacher-forced prompt ids differ from the ids generation consumed .first at position 3"):
            tr.compute_loss(tr.model, inputs)
    request = engine_module.VLLMEngine._request

    def mirrored(self, prompt):
        r = request(self, prompt)
        r["multi_modal_data"] = {"image": r["multi_modal_data"]["image"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)}
        return r

    with monkeypatch.context() as m:
        m.setattr(engine_module.VLLMEngine, "_request", mirrored)
        with pytest.raises(PromptMismatchError, match="sample 0: the teacher-forced image pixels differ from the ones generation consumed"):
            tr.compute_loss(tr.model, inputs)
    tr.compute_loss(tr.model, inputs)  # untouched, the same batch trains


# ------------------------------------------------------------------------------- rollout window


def test_one_engine_call_per_optimizer_step_equals_per_micro_batch_with_vllm(vllm_trainer, shapes_dir, tmp_path):
    """rollout_window: optimizer_step rolls the 2 micro-batches of a step out in ONE vLLM call and trains
    exactly like rolling each out before its forward: same rollouts, losses and counters (fp32 greedy).
    Both runs borrow the session's engine (it takes each run's weights at its first rollout)."""
    from src.sft import build_trainer
    from src.trainers.base import EngineWeightSync
    from tests.test_trainers import assert_same_training, train_counting_engine_calls

    engine = vllm_trainer.rollout_engine
    model_dir = Path(vllm_trainer.run_config.model.model_name_or_path)  # the session engine's architecture

    def run(window: str):
        cfg = vllm_cfg(model_dir, shapes_dir, tmp_path / window,
                       custom={"extra": {"rollout_matching": {"rollout_window": window}}},
                       training={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "max_steps": 2})
        tr = build_trainer(cfg)
        tr.rollout_engine = engine
        tr.add_callback(EngineWeightSync(engine))
        return train_counting_engine_calls(tr)

    calls_step, logs_step, ro_step = run("optimizer_step")
    calls_micro, logs_micro, ro_micro = run("micro_batch")
    assert calls_step == [2, 2] and calls_micro == [1, 1, 1, 1]
    assert_same_training(ro_step, ro_micro, logs_step, logs_micro)
    assert all(h["time/weight_push_s"] > 0 for h in logs_step + logs_micro)  # each step's rollout followed a push
    engine.mark_stale()  # it holds the borrowed runs' weights now


# ------------------------------------------------------------------------------------ sampling


def test_sampling_parameters_mean_what_the_hf_ones_mean():
    from src.rollout.engine import DecodeSettings
    from src.rollout.vllm import sampling_params

    greedy = sampling_params(DecodeSettings(max_new_tokens=7, temperature=0.0), eos_id=1, pad_id=2, seeds=[11])[0]
    assert (greedy.temperature, greedy.top_p, greedy.max_tokens, greedy.seed) == (0.0, 1.0, 7, None)
    assert greedy.stop_token_ids == [1, 2] and not greedy.skip_special_tokens and greedy.repetition_penalty == 1.0
    s = DecodeSettings(decode_mode="sample", max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.1)
    a, b = sampling_params(s, eos_id=1, pad_id=2, seeds=[11, 12])
    assert (a.temperature, a.top_p, a.repetition_penalty, a.seed, b.seed) == (0.7, 0.9, 1.1, 11, 12)
    assert a.top_k in (0, -1)  # vLLM's "all tokens"
    assert sampling_params(replace(s, top_k=5), 1, 2, [0])[0].top_k == 5


def test_sampled_rollouts_follow_the_torch_seed(vllm_trainer, shapes_dir, sample_images, monkeypatch):
    """decode_mode: sample draws one seed per request from the rank's torch RNG: the same torch seed gives
    the same rollouts, another seed others."""
    tr, engine = vllm_trainer, vllm_trainer.rollout_engine
    monkeypatch.setattr(engine, "settings", replace(engine.settings, decode_mode="sample", temperature=1.0))
    prompts = parity_prompts(tr, shapes_dir, sample_images)[:3]

    def sample(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        return [r.response_ids for r in engine.generate(tr.rollout_model(), prompts)]

    assert sample(0) == sample(0) != sample(1)


# ---------------------------------------------------------------------------------- command line


def test_src_infer_with_vllm_writes_the_same_raw_text_as_hf(demo_model_dirs, shapes_dir, tmp_path):
    """``python -m src.infer --config X``: backend vllm and backend hf write the same raw_text for every image
    (float32 tiny Qwen3-VL, head_dim 32)."""
    from src.infer import main as infer

    texts = {}
    for backend in ("hf", "vllm"):
        cfg = tmp_path / f"{backend}.yaml"
        cfg.write_text(yaml.safe_dump({"custom": {"extra": {"rollout_matching": {"backend": backend, "max_new_tokens": 32,
                                                                                 "vllm": {"dtype": "float32"}}}}}))
        out = tmp_path / f"{backend}.jsonl"
        args = ["--model", str(demo_model_dirs["qwen3_vl"]), "--jsonl", str(shapes_dir / "val.jsonl"), "--out", str(out), "--config", str(cfg)]
        if backend == "hf":
            assert infer(args) == 0
        else:  # the command line itself, in its own process (its engine is not the session's)
            run([sys.executable, "-m", "src.infer", *args], timeout=900)
        texts[backend] = [json.loads(line)["raw_text"] for line in out.read_text().splitlines()]
    assert len(texts["hf"]) == 4 and texts["vllm"] == texts["hf"]
    assert len(set(texts["hf"])) == 4  # four different answers: the comparison is not vacuous


def smoke_config(tmp_path: Path, model_dir: Path, shapes: Path, name: str, **training) -> tuple[Path, Path]:
    out = tmp_path / name
    cfg = {
        "extends": str(ROOT / "configs" / "smoke" / "rollout_matching_tiny_vllm.yaml"),
        "model": {"model_name_or_path": str(model_dir), "build_tiny": None},
        "custom": {"train_jsonl": str(shapes / "train.jsonl"), "val_jsonl": str(shapes / "val.jsonl"), "shapes_data": None},
        "training": {"output_dir": str(out), **training},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, out


COUNTERS = ("rollout/parse_dropped_invalid", "rollout/parse_truncated", "rollout/valid_pred_objects", "rollout/matched_for_supervision",
            "rollout/excluded_from_supervision", "rollout/fn_appended", "rollout/gating_rejections", "rollout/gt_objects",
            "rollout/repeat_guard_stops", "loss/ce", "loss/coord", "time/weight_push_s")


def test_the_vllm_smoke_config_trains_under_python_m_src_sft(demo_model_dirs, shapes_dir, tmp_path):
    cfg, out = smoke_config(tmp_path, demo_model_dirs["qwen3_vl"], shapes_dir, "smoke", max_steps=3)
    run([sys.executable, "-m", "src.sft", "--config", str(cfg)], timeout=900)
    logs = train_logs(out)
    assert len(logs) == 3 and all(k in h for h in logs for k in COUNTERS)
    assert all(h["rollout/samples"] == 2 and h["time/weight_push_s"] > 0 for h in logs)
    assert json.loads((out / "summary.json").read_text())["eval_rollout_images"] == 4  # evaluation rolled out with the engine too


def test_the_vllm_smoke_config_trains_under_torchrun_two_processes(demo_model_dirs, shapes_dir, tmp_path):
    """One engine per rank (gloo DDP on the CPU); the run ends cleanly (engine down before the group)."""
    cfg, out = smoke_config(tmp_path, demo_model_dirs["qwen3_vl"], shapes_dir, "ddp", max_steps=2, per_device_train_batch_size=1)
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "src.sft", "--config", str(cfg)], timeout=900)
    logs = train_logs(out)
    assert len(logs) == 2 and all(k in h for h in logs for k in COUNTERS)
    assert all(h["rollout/samples"] == 2 for h in logs)  # one sample per rank, summed over both
    assert "DDP over gloo, 2 processes" in r.stdout
    assert "Invalid process group" not in r.stderr
