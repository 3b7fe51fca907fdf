"""Stage-1 and stage-2 trainers with tiny models (SPEC §10-§13): one forward per micro-batch, checks,
gradient flow, degenerate inputs, decoding, normalisation under gradient accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from src.config.loader import ConfigError, config_from_dict, merge
from src.data.contract import load_jsonl


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from src.data.make_shapes import make_shapes

    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num_train=8, num_val=4, seed=0, image_size=64, min_shapes=1, max_shapes=2, kinds=("rectangle", "triangle"))
    return out


def make_cfg(model_dir, shapes_dir, tmp_path, variant="rollout_matching_sft", **over):
    base = {
        "model": {"model_name_or_path": str(model_dir)},
        "custom": {"trainer_variant": variant, "train_jsonl": str(shapes_dir / "train.jsonl"), "val_jsonl": str(shapes_dir / "val.jsonl"),
                   "extra": {"rollout_matching": {"max_new_tokens": 12, "decode_batch_size": 4, "log_rollout_samples": 2}}},
        "training": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 2, "max_steps": 1, "learning_rate": 1e-2,
                     "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": 0},
    }
    return config_from_dict(merge(base, over))


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
    from src.trainers.encoding import SupervisedSequence, right_padded_teacher_forced
    from src.trainers.rollout_matching import PromptMismatchError, SupervisionSpanError, check_prompt_alignment, check_supervision_span

    inputs = stage2_inputs(trainer2, records(shapes_dir, 1))
    p = inputs["prompts"][0]
    seq = SupervisedSequence(prompt=p, assistant_ids=[1, 2, 3], ce_targets=[1, 2, 3], coord_bins=[-1, -1, -1])
    batch = right_padded_teacher_forced([seq], pad_id=0)
    check_prompt_alignment(batch, [p])
    check_supervision_span(batch, [3])
    tampered = {**batch, "input_ids": batch["input_ids"].clone()}
    tampered["input_ids"][0, 5] += 1
    with pytest.raises(PromptMismatchError, match="differ"):
        check_prompt_alignment(tampered, [p])
    shorter = {**batch, "assistant_start": batch["assistant_start"] - 1}
    with pytest.raises(PromptMismatchError, match="tokens"):
        check_prompt_alignment(shorter, [p])
    bad_mask = {**batch, "supervised_mask": batch["supervised_mask"].clone()}
    bad_mask["supervised_mask"][0, 2] = True  # a prompt position
    with pytest.raises(SupervisionSpanError):
        check_supervision_span(bad_mask, [3])


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
    rollouts = trainer2.rollout_backend.generate(trainer2.rollout_model(), inputs["prompts"])
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
    rollouts = trainer2.rollout_backend.generate(trainer2.rollout_model(), inputs["prompts"])
    (parsed, match, tgt), = trainer2.build_targets([rec], rollouts)
    assert trainer2.table.text(tgt.y_ids[tgt.prefix_len:]) == "}<|im_end|>"
    assert len(tgt.ce_positions) == 2 and tgt.fn_appended == 0
    trainer2.model.train()
    loss = trainer2.compute_loss(trainer2.model, inputs)
    assert torch.isfinite(loss) and loss.item() > 0


# ---------------------------------------------------------------------------------- decoding


def test_greedy_rollout_equals_standalone_generate(trainer2, shapes_dir):
    from src.trainers.encoding import left_padded_prompts

    inputs = stage2_inputs(trainer2, records(shapes_dir, 1))
    (ro,) = trainer2.rollout_backend.generate(trainer2.rollout_model(), inputs["prompts"])
    model = trainer2.rollout_model()
    model.eval()
    batch = left_padded_prompts(inputs["prompts"], trainer2.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False, num_beams=1)
    ref = out[0, batch["input_ids"].shape[1]:].tolist()
    assert ro.response_ids == ref[: len(ro.response_ids)]
    assert model.training is False or True  # generation_mode restores the mode it found


def test_generation_restores_train_mode(trainer2, shapes_dir):
    inputs = stage2_inputs(trainer2, records(shapes_dir, 1))
    model = trainer2.rollout_model()
    model.train()
    trainer2.rollout_backend.generate(model, inputs["prompts"])
    assert model.training


def test_beam_selects_the_best_beam(tiny_model_dirs, shapes_dir, tmp_path):
    from src.trainers.encoding import left_padded_prompts

    cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path,
                   custom={"extra": {"rollout_matching": {"decode_mode": "beam", "num_beams": 3}}})
    tr = make_trainer(cfg)
    inputs = stage2_inputs(tr, records(shapes_dir, 1))
    (ro,) = tr.rollout_backend.generate(tr.rollout_model(), inputs["prompts"])
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


def test_evaluate_reports_rollout_f1(trainer2):
    m = trainer2.evaluate()
    for k in ("eval_rollout_precision", "eval_rollout_recall", "eval_rollout_f1", "eval_rollout_parse_valid_rate"):
        assert k in m
    assert m["eval_rollout_images"] == 4


def test_repeat_guard_stops_degenerate_rollouts_and_is_counted(tiny_model_dirs, shapes_dir, tmp_path):
    cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path, custom={"extra": {"rollout_matching": {
        "max_new_tokens": 40, "repeat_guard": {"enabled": True, "ngram_size": 2, "ngram_max_repeats": 3}}}})
    tr = make_trainer(cfg)
    inputs = stage2_inputs(tr, records(shapes_dir, 2))
    rollouts = tr.rollout_backend.generate(tr.rollout_model(), inputs["prompts"])
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
    from src.trainers.rollout import Rollout

    cap = 3000
    cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes_dir, tmp_path, custom={"extra": {"rollout_matching": {"max_new_tokens": cap}}})
    tr = make_trainer(cfg)
    recs = records(shapes_dir, 1)
    inputs = stage2_inputs(tr, recs)
    objs = [DetObject(f"shape {i % 7}", "bbox_2d", (i % 900, (7 * i) % 900, i % 900 + 40, (7 * i) % 900 + 60)) for i in range(200)]
    long_ids = tr.table.encode(serialize_objects(objs))[:cap]
    tr.rollout_backend.generate = lambda model, prompts, synced_gpus=False: [Rollout(p, list(long_ids), hit_max_new_tokens=True) for p in prompts]
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
