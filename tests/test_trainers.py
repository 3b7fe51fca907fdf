"""Stage-1 and stage-2 trainers with tiny models (SPEC §10-§13): one forward per micro-batch, checks,
gradient flow, degenerate inputs, decoding, normalisation under gradient accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from src.config.loader import ConfigError, config_from_dict, merge
from src.data.contract import load_jsonl


def make_cfg(model_dir, shapes_dir, tmp_path, variant="rollout_matching_sft", **over):
    base = {
        "model": {"model_name_or_path": str(model_dir)},
        "custom": {"trainer_variant": variant, "train_jsonl": str(shapes_dir / "train.jsonl"), "val_jsonl": str(shapes_dir / "val.jsonl"),
                   "extra": {"rollout_matching": {"max_new_tokens": 12, "decode_batch_size": 4, "log_rollout_samples": 2}}},
        "training": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 2, "max_steps": 1, "learning_rate": 1e-2,
                     "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": 0},
    }
    return config_from_dict(merge(base, over))


def fake_rollout(prompt, response_ids, hit_max_new_tokens=False):
    """A rollout as an engine that consumed exactly ``prompt`` would report it (for fake engines in tests)."""
    from src.rollout.encoding import image_digests
    from src.rollout.engine import Rollout

    return Rollout(prompt, list(response_ids), hit_max_new_tokens=hit_max_new_tokens, consumed_prompt_ids=tuple(prompt.input_ids.tolist()),
                   consumed_image_digest=image_digests(prompt.pixel_values, prompt.image_grid_thw)[0])


def make_trainer(cfg):
    from src.sft import build_trainer

    return build_trainer(cfg)


def records(shapes_dir, n=2, split="train"):
    return load_jsonl(shapes_dir / f"{split}.jsonl")[0][:n]


def stage2_inputs(trainer, recs):
    return trainer.data_collator([{"record": r, "index": i} for i, r in enumerate(recs)])


@pytest.fixture()
def trainer2(tiny_model_dirs, shapes_dir, tmp_path):
    return make_trainer(make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path))


# ------------------------------------------------------------------------------------ one forward


def test_one_teacher_forced_forward_per_micro_batch(trainer2, shapes_dir):
    model = trainer2.model
    calls = {"forward": 0, "in_generate": 0}
    depth = {"gen": 0}
    orig_generate = model.generate

    def generate(*a, **k):
        depth["gen"] += 1
        try:
            return orig_generate(*a, **k)
        finally:
            depth["gen"] -= 1

    def count(module, args):
        calls["in_generate" if depth["gen"] else "forward"] += 1

    model.generate = generate
    handle = model.register_forward_pre_hook(count)
    try:
        inputs = stage2_inputs(trainer2, records(shapes_dir))
        model.train()
        loss = trainer2.compute_loss(model, inputs)
    finally:
        del model.generate
        handle.remove()
    assert calls["forward"] == 1 and calls["in_generate"] >= 1
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------- checks


def test_prompt_mismatch_and_span_checks_raise(trainer2, shapes_dir):
    from dataclasses import replace

    from src.trainers.batches import SupervisedSequence, right_padded_teacher_forced
    from src.trainers.rollout_matching import PromptMismatchError, SupervisionSpanError, check_prompt_alignment, check_supervision_span

    inputs = stage2_inputs(trainer2, records(shapes_dir, 1))
    (ro,) = trainer2.rollout_engine.generate(trainer2.rollout_model(), inputs["prompts"])
    assert list(ro.consumed_prompt_ids) == inputs["prompts"][0].input_ids.tolist() and len(ro.consumed_image_digest) == 40
    seq = SupervisedSequence(prompt=ro.prompt, assistant_ids=[1, 2, 3], ce_targets=[1, 2, 3], coord_bins=[-1, -1, -1])
    batch = right_padded_teacher_forced([seq], pad_id=0)
    check_prompt_alignment(batch, [ro])
    check_supervision_span(batch, [3])
    tampered = {**batch, "input_ids": batch["input_ids"].clone()}
    tampered["input_ids"][0, 5] += 1
    with pytest.raises(PromptMismatchError, match="differ from the ids generation consumed .first at position 5"):
        check_prompt_alignment(tampered, [ro])
    with pytest.raises(PromptMismatchError, match="tokens, generation consumed"):
        check_prompt_alignment(batch, [replace(ro, consumed_prompt_ids=ro.consumed_prompt_ids[1:])])
    other_pixels = {**batch, "pixel_values": batch["pixel_values"] + 1}
    with pytest.raises(PromptMismatchError, match="image pixels differ"):
        check_prompt_alignment(other_pixels, [ro])
    bad_mask = {**batch, "supervised_mask": batch["supervised_mask"].clone()}
    bad_mask["supervised_mask"][0, 2] = True  # a prompt position
    with pytest.raises(SupervisionSpanError):
        check_supervision_span(bad_mask, [3])


def test_prompt_check_compares_with_what_generation_consumed(trainer2, shapes_dir, monkeypatch):
    """The check used to compare the teacher-forced prompt with the very objects it was built from, so it
    could not fail. An engine that feeds generate something else (here: a padding bug dropping a prompt
    token) must now stop training with PromptMismatchError."""
    import src.rollout.hf as rollout
    from src.trainers.rollout_matching import PromptMismatchError

    real = rollout.left_padded_prompts

    def dropping_first_token(prompts, pad_id):
        batch = real(prompts, pad_id)
        batch["input_ids"] = torch.cat([torch.full_like(batch["input_ids"][:, :1], pad_id), batch["input_ids"][:, :-1]], dim=1)
        return batch

    monkeypatch.setattr(rollout, "left_padded_prompts", dropping_first_token)
    inputs = stage2_inputs(trainer2, records(shapes_dir, 2))
    trainer2.model.train()
    with pytest.raises(PromptMismatchError, match="sample 0: teacher-forced prompt ids differ from the ids generation consumed"):
        trainer2.compute_loss(trainer2.model, inputs)


# ------------------------------------------------------------------------------ gradient flow


def test_step_changes_parameters_and_reaches_coord_rows(trainer2, shapes_dir):
    model = trainer2.model
    emb = model.get_input_embeddings().weight
    coord_ids = torch.as_tensor(trainer2.table.coord_ids)
    before = emb.detach().clone()
    inputs = stage2_inputs(trainer2, records(shapes_dir))
    model.train()
    model.zero_grad()
    loss = trainer2.compute_loss(model, inputs)
    loss.backward()
    assert emb.grad is not None and emb.grad[coord_ids].abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert not torch.equal(before, emb.detach())


def test_garbage_rollouts_still_train_via_fn_append(trainer2, shapes_dir):
    """The random tiny model emits garbage: no valid object, every GT object appended, finite loss."""
    recs = records(shapes_dir)
    inputs = stage2_inputs(trainer2, recs)
    rollouts = trainer2.rollout_engine.generate(trainer2.rollout_model(), inputs["prompts"])
    built = trainer2.build_targets(recs, rollouts)
    assert all(len(p.objects) == 0 for p, _, _ in built)
    assert [t.fn_appended for _, _, t in built] == [len(r.objects) for r in recs]
    trainer2.model.train()
    loss = trainer2.compute_loss(trainer2.model, inputs)
    assert torch.isfinite(loss) and loss.item() > 0
    s = trainer2.step_metrics.reduce()
    assert s["rollout/fn_appended"] == sum(len(r.objects) for r in recs)
    assert s["rollout/samples"] == 2 and s["rollout/valid_pred_objects"] == 0


def test_zero_gt_image_trains_close_brace_and_eos(trainer2, shapes_dir):
    from dataclasses import replace

    rec = replace(records(shapes_dir, 1)[0], objects=())
    inputs = stage2_inputs(trainer2, [rec])
    rollouts = trainer2.rollout_engine.generate(trainer2.rollout_model(), inputs["prompts"])
    (parsed, match, tgt), = trainer2.build_targets([rec], rollouts)
    assert trainer2.table.text(tgt.y_ids[tgt.prefix_len:]) == "}<|im_end|>"
    assert len(tgt.ce_positions) == 2 and tgt.fn_appended == 0
    trainer2.model.train()
    loss = trainer2.compute_loss(trainer2.model, inputs)
    assert torch.isfinite(loss) and loss.item() > 0


# ---------------------------------------------------------------------------------- decoding


def test_greedy_rollout_equals_standalone_generate(trainer2, shapes_dir):
    from src.rollout.encoding import left_padded_prompts

    inputs = stage2_inputs(trainer2, records(shapes_dir, 1))
    (ro,) = trainer2.rollout_engine.generate(trainer2.rollout_model(), inputs["prompts"])
    model = trainer2.rollout_model()
    model.eval()
    batch = left_padded_prompts(inputs["prompts"], trainer2.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False, num_beams=1)
    ref = out[0, batch["input_ids"].shape[1]:].tolist()
    assert ro.response_ids == ref[: len(ro.response_ids)] and len(ro.response_ids) >= 1


def test_generation_restores_train_mode(trainer2, shapes_dir):
    inputs = stage2_inputs(trainer2, records(shapes_dir, 1))
    model = trainer2.rollout_model()
    model.train()
    trainer2.rollout_engine.generate(model, inputs["prompts"])
    assert model.training


def test_beam_selects_the_best_beam(tiny_model_dirs, shapes_dir, tmp_path):
    from src.rollout.encoding import left_padded_prompts

    cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path,
                   custom={"extra": {"rollout_matching": {"decode_mode": "beam", "num_beams": 3}}})
    tr = make_trainer(cfg)
    inputs = stage2_inputs(tr, records(shapes_dir, 1))
    (ro,) = tr.rollout_engine.generate(tr.rollout_model(), inputs["prompts"])
    model = tr.rollout_model().eval()
    batch = left_padded_prompts(inputs["prompts"], tr.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, num_beams=3, num_return_sequences=3, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, early_stopping=True)
    best = int(out.sequences_scores.argmax())
    ref = out.sequences[best, batch["input_ids"].shape[1]:].tolist()
    assert ro.response_ids == ref[: len(ro.response_ids)]


# ----------------------------------------------------------------------------- normalisation


def test_gradient_accumulation_2x1_matches_batch_2(tiny_model_dirs, shapes_dir, tmp_path):
    cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path)
    tr = make_trainer(cfg)
    model = tr.model
    model.train()
    recs = records(shapes_dir, 2)

    def grads(batches):
        model.zero_grad()
        for b in batches:
            (tr.compute_loss(model, stage2_inputs(tr, b)) / len(batches)).backward()  # the Trainer's 1/GA
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()

    g_batch = grads([recs])
    g_accum = grads([[recs[0]], [recs[1]]])
    assert torch.allclose(g_batch, g_accum, rtol=1e-4, atol=1e-6)


def test_packing_with_stage2_fails_fast(tiny_model_dirs, shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="training.packing"):
        make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path, training={"packing": True})


# ------------------------------------------------------------------------------------ stage 1


def test_stage1_collator_supervises_assistant_only(tiny_model_dirs, shapes_dir, tmp_path):
    tr = make_trainer(make_cfg(tiny_model_dirs["qwen2_5_vl"], shapes_dir, tmp_path, variant="sft"))
    recs = records(shapes_dir, 2)
    batch = tr.data_collator([{"record": r, "index": i} for i, r in enumerate(recs)])
    mask, start = batch["supervised_mask"], batch["assistant_start"]
    for b in range(2):
        pos = mask[b].nonzero(as_tuple=True)[0]
        assert int(pos.min()) == int(start[b]) - 1  # the first assistant token is predicted at start-1
        ids = batch["input_ids"][b]
        coord = batch["coord_bins"][b][pos]
        targets = ids[pos + 1]
        assert all(tr.table.bin_of(int(t)) == int(c) for t, c in zip(targets, coord) if c >= 0)
        assert int(ids[pos.max() + 1]) == tr.table.im_end_id  # EOS supervised
    tr.model.train()
    loss = tr.compute_loss(tr.model, tr._prepare_inputs(batch))
    assert torch.isfinite(loss)


def test_logged_metrics_are_reduced_once_per_log(tiny_model_dirs, shapes_dir, tmp_path):
    cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path, training={"max_steps": 2})
    tr = make_trainer(cfg)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        for key in ("loss/ce", "loss/coord", "loss/coord_prefix", "loss/coord_tail", "rollout/parse_dropped_invalid",
                    "rollout/parse_truncated", "rollout/valid_pred_objects", "rollout/matched_for_supervision",
                    "rollout/excluded_from_supervision", "rollout/fn_appended", "rollout/gating_rejections",
                    "rollout/gt_objects", "rollout/match_rate"):
            assert key in h, key
        assert h["rollout/samples"] == 2  # per optimizer step: one micro-batch of 2
    lines = (Path(cfg.training.args["output_dir"]) / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"raw_rollout", "valid_objects", "matches", "fn_appended", "y_train"} <= set(json.loads(lines[0]))


def test_evaluate_reports_rollout_f1(trainer2, capsys):
    m = trainer2.evaluate()
    err = capsys.readouterr().err
    assert "eval rollouts: 100%" in err and "4/4" in err  # a progress bar over the validation images
    for k in ("eval_rollout_precision", "eval_rollout_recall", "eval_rollout_f1", "eval_rollout_parse_valid_rate"):
        assert k in m
    assert m["eval_rollout_images"] == 4


def test_repeat_guard_stops_degenerate_rollouts_and_is_counted(tiny_model_dirs, shapes_dir, tmp_path):
    cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path, custom={"extra": {"rollout_matching": {
        "max_new_tokens": 40, "repeat_guard": {"enabled": True, "ngram_size": 2, "ngram_max_repeats": 3}}}})
    tr = make_trainer(cfg)
    inputs = stage2_inputs(tr, records(shapes_dir, 2))
    rollouts = tr.rollout_engine.generate(tr.rollout_model(), inputs["prompts"])
    assert all(r.stopped_by_guard and not r.hit_max_new_tokens and len(r.response_ids) < 40 for r in rollouts)
    tr.model.train()
    tr.compute_loss(tr.model, inputs)
    assert tr.step_metrics.reduce()["rollout/repeat_guard_stops"] == 2


def test_repeat_guard_with_beam_is_refused(tiny_model_dirs, shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="repeat_guard"):
        make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path, custom={"extra": {"rollout_matching": {
            "decode_mode": "beam", "num_beams": 2, "repeat_guard": {"enabled": True}}}})


def test_long_rollout_at_the_cap_trains_with_selective_logits_and_is_counted(tiny_model_dirs, shapes_dir, tmp_path):
    """A rollout of thousands of tokens cut by max_new_tokens: counted as hit-the-cap and truncated (not an
    error), its complete objects kept, and logits computed only at the supervised positions."""
    from src.data.objects import DetObject
    from src.data.serialize import serialize_objects

    cap = 3000
    cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path, custom={"extra": {"rollout_matching": {"max_new_tokens": cap}}})
    tr = make_trainer(cfg)
    recs = records(shapes_dir, 1)
    inputs = stage2_inputs(tr, recs)
    objs = [DetObject(f"shape {i % 7}", "bbox_2d", (i % 900, (7 * i) % 900, i % 900 + 40, (7 * i) % 900 + 60)) for i in range(200)]
    long_ids = tr.table.encode(serialize_objects(objs))[:cap]
    tr.rollout_engine.generate = lambda model, prompts, synced_gpus=False: [fake_rollout(p, long_ids, hit_max_new_tokens=True) for p in prompts]
    rows = []
    handle = tr.model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape))
    try:
        tr.model.train()
        loss = tr.compute_loss(tr.model, inputs)
        loss.backward()
    finally:
        handle.remove()
    s = tr.step_metrics.reduce()
    assert torch.isfinite(loss)
    assert s["rollout/hit_max_new_tokens"] == 1 and s["rollout/parse_truncated"] == 1
    assert s["rollout/valid_pred_objects"] > 50
    (shape,) = rows
    supervised = s["ce_count"] + s["coord_count"]
    assert shape[0] == supervised and supervised < 0.2 * cap  # logits only where supervised, not over ~3,000 positions


# ------------------------------------------------- rollout window and loss normalisation (GA, ranks)


def step_gradient(tiny_model_dirs, shapes_dir, out, per_device: int, ga: int, **rm) -> dict[str, torch.Tensor]:
    """The gradient of the first optimizer step, as the Trainer's loop accumulated it (before the step)."""
    from transformers import TrainerCallback

    grads: dict[str, torch.Tensor] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, out, custom={"extra": {"rollout_matching": rm}},
                   training={"per_device_train_batch_size": per_device, "gradient_accumulation_steps": ga, "max_steps": 1,
                             "max_grad_norm": 0.0})
    tr = make_trainer(cfg)
    tr.add_callback(Capture())
    tr.train()
    assert grads
    return grads


def max_relative_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a if a[k].norm() > 0)


@pytest.mark.parametrize("normalization", ["sample", "token"])
def test_gradient_accumulation_2x1_equals_a_batch_of_2_through_the_trainer(tiny_model_dirs, shapes_dir, tmp_path, normalization):
    """Both loss normalisations are exact under gradient accumulation: the Trainer's own loop with
    accumulation 2 x batch 1 gives the gradient of one batch of 2. (Across ranks: tests/test_distributed.py.)"""
    one = step_gradient(tiny_model_dirs, shapes_dir, tmp_path / "b2", 2, 1, loss_normalization=normalization)
    two = step_gradient(tiny_model_dirs, shapes_dir, tmp_path / "ga2", 1, 2, loss_normalization=normalization)
    assert max_relative_difference(one, two) < 1e-5


def test_token_normalisation_weighs_positions_not_samples(tiny_model_dirs, shapes_dir, tmp_path):
    """The two schemes give different steps when samples have different numbers of supervised positions
    (here: different FN tails), and 'token' equals the hand-computed mean over all positions."""
    sample = step_gradient(tiny_model_dirs, shapes_dir, tmp_path / "s", 2, 1, loss_normalization="sample")
    token = step_gradient(tiny_model_dirs, shapes_dir, tmp_path / "t", 2, 1, loss_normalization="token")
    assert max_relative_difference(sample, token) > 1e-2

    from src.losses.supervised import teacher_forced_losses

    torch.manual_seed(0)
    logits = torch.randn(7, 1100, requires_grad=True)
    ce = torch.tensor([3, 4, -100, 5, 6, 7, 8])
    bins = torch.full((7,), -1)
    sample_idx = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    coord_ids = torch.arange(100, 1100)  # no position is a coord position in this check
    out = teacher_forced_losses(logits, ce, bins, torch.ones(7, dtype=torch.long), sample_idx, 2, coord_ids, token_denominator=6.0)
    per_token = torch.nn.functional.cross_entropy(logits[ce >= 0], ce[ce >= 0], reduction="sum") / 6.0
    assert torch.allclose(out.loss, per_token)


def test_one_rollout_call_per_optimizer_step_equals_per_micro_batch(tiny_model_dirs, shapes_dir, tmp_path):
    """rollout_window: optimizer_step rolls the 2 micro-batches of a step out in ONE engine call and trains
    exactly as rolling each out before its forward (greedy, fp32): same rollouts, losses and counters."""
    def run(window: str):
        cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path / window,
                       custom={"extra": {"rollout_matching": {"rollout_window": window, "log_rollout_samples": 4}}},
                       training={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "max_steps": 2})
        return train_counting_engine_calls(make_trainer(cfg))

    calls_step, logs_step, ro_step = run("optimizer_step")
    calls_micro, logs_micro, ro_micro = run("micro_batch")
    assert calls_step == [2, 2] and calls_micro == [1, 1, 1, 1]
    assert_same_training(ro_step, ro_micro, logs_step, logs_micro)


def train_counting_engine_calls(tr) -> tuple[list[int], list[dict], list[dict]]:
    """Train; return the number of prompts of each engine call, the train logs and the rollouts.jsonl lines."""
    engine, calls = tr.rollout_engine, []
    generate = engine.generate
    engine.generate = lambda model, prompts, synced_gpus=False: (calls.append(len(prompts)), generate(model, prompts, synced_gpus))[1]
    try:
        tr.train()
    finally:
        del engine.generate  # the instance attribute goes, the method shows again
    logs = [h for h in tr.state.log_history if "loss" in h]
    rollouts = [json.loads(line) for line in (Path(tr.args.output_dir) / "rollouts.jsonl").read_text().splitlines()]
    return calls, logs, rollouts


def assert_same_training(rollouts_a: list[dict], rollouts_b: list[dict], logs_a: list[dict], logs_b: list[dict]) -> None:
    """Two runs rolled out the same tokens (``rollouts.jsonl`` lines) and logged the same losses and counters."""
    assert [r["response_token_ids"] for r in rollouts_a] == [r["response_token_ids"] for r in rollouts_b] and len(rollouts_a) == 4
    assert len(logs_a) == len(logs_b)
    for a, b in zip(logs_a, logs_b):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        for k in a:
            if k.startswith(("rollout/", "loss/", "tokens/")):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k


def test_token_normalisation_needs_the_optimizer_step_window(tiny_model_dirs, shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="loss_normalization: token needs rollout_window: optimizer_step"):
        make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path, custom={"extra": {"rollout_matching": {
            "loss_normalization": "token", "rollout_window": "micro_batch"}}})


# ------------------------------------------------------------------ explicit sampling parameters


def test_sampling_inherits_nothing_from_the_checkpoints_generation_config(tiny_model_dirs, tmp_path):
    """A checkpoint whose generation_config.json sets top_k 20, min_p, typical_p, a temperature, a
    repetition penalty and suppressed tokens: our 'sample' rollout equals plain sampling with temperature 1,
    top_k off, top_p 1 and nothing else (same seed), and 'greedy' stays argmax decoding."""
    import shutil

    from transformers import GenerationConfig

    from src.models.loading import load_model_and_processor
    from src.data.prompt import prompt_text
    from src.rollout.encoding import encode_prompt, left_padded_prompts
    from src.rollout.engine import DecodeSettings
    from src.rollout.hf import HFEngine
    from src.rollout_matching.tokens import token_table
    from PIL import Image

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dirs["qwen3_vl"], ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "top_k": 20, "top_p": 0.5, "min_p": 0.2, "typical_p": 0.4, "temperature": 0.3,
        "repetition_penalty": 1.5, "suppress_tokens": list(range(100, 5000)), "epsilon_cutoff": 0.0003,
    }))
    model, processor = load_model_and_processor(ckpt)
    assert model.generation_config.top_k == 20  # the checkpoint's settings are there to be inherited
    table = token_table(processor.tokenizer)
    prompt = encode_prompt(processor, Image.new("RGB", (64, 64), (90, 30, 200)), prompt_text(processor))
    pad = processor.tokenizer.pad_token_id
    batch = left_padded_prompts([prompt], pad)
    L = batch["input_ids"].shape[1]

    def ours(mode: str, seed: int) -> list[int]:
        s = DecodeSettings(decode_mode=mode, max_new_tokens=12, temperature=1.0 if mode == "sample" else 0.0, top_k=0, top_p=1.0)
        torch.manual_seed(seed)
        return HFEngine(s, eos_id=table.im_end_id, pad_id=pad).generate(model, [prompt])[0].response_ids

    def reference(do_sample: bool, seed: int) -> list[int]:
        saved = model.generation_config
        model.generation_config = GenerationConfig()
        try:
            torch.manual_seed(seed)
            with torch.no_grad():
                out = model.eval().generate(**batch, max_new_tokens=12, do_sample=do_sample, temperature=1.0, top_k=0, top_p=1.0,
                                            eos_token_id=[table.im_end_id, pad], pad_token_id=pad)
        finally:
            model.generation_config = saved
        ids = out[0, L:].tolist()
        stop = next((k for k, t in enumerate(ids) if t in (table.im_end_id, pad)), None)
        return ids if stop is None else ids[: stop + 1] if ids[stop] == table.im_end_id else ids[:stop]

    for seed in (0, 1):
        assert ours("sample", seed) == reference(True, seed)
    assert ours("greedy", 0) == reference(False, 0)
    assert ours("sample", 0) != ours("sample", 1)  # really sampling


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_rollouts_make_transformers_log_no_warning(tiny_loaded, mode):
    """Every call of ``generate`` used to log "Both `min_new_tokens` and `min_length` seem to have been set"
    (once per micro-batch in every run): the explicit generation config must not contradict itself."""
    import logging

    from PIL import Image

    from src.data.prompt import prompt_text
    from src.rollout.encoding import encode_prompt
    from src.rollout.engine import DecodeSettings
    from src.rollout.hf import HFEngine
    from src.rollout_matching.tokens import token_table

    model, processor = tiny_loaded["qwen3_vl"]
    table = token_table(processor.tokenizer)
    prompt = encode_prompt(processor, Image.new("RGB", (64, 64), (90, 30, 200)), prompt_text(processor))
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, logger = Keep(level=logging.WARNING), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        s = DecodeSettings(decode_mode=mode, max_new_tokens=4, temperature=1.0 if mode == "sample" else 0.0, top_k=0, top_p=1.0)
        out = HFEngine(s, eos_id=table.im_end_id, pad_id=processor.tokenizer.pad_token_id).generate(model, [prompt])
    finally:
        logger.removeHandler(handler)
    assert len(out) == 1 and 1 <= len(out[0].response_ids) <= 4
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
