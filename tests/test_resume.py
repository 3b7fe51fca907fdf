"""Resumable stage-2 runs (reliability issue, item 4).

An uninterrupted 4-step run (checkpoints every 2 steps) against a run resumed from its step-2
checkpoint: the resumed run starts at global step 2, restores optimizer, scheduler and RNG state, and
its step-3/4 losses and learning rates equal the uninterrupted run's. The checkpoint directory is itself
loadable (model + processor).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_trainers import make_cfg

pytestmark = pytest.mark.slow


def losses(trainer) -> dict[int, dict]:
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def test_stage2_resume_continues_where_it_stopped(tiny_model_dirs, tmp_path):
    from src.data.make_shapes import make_shapes
    from src.sft import build_trainer

    shapes = tmp_path / "shapes"
    make_shapes(shapes, num_train=8, num_val=2, seed=5, image_size=64, min_shapes=1, max_shapes=2, kinds=("rectangle", "triangle"))
    common = {"training": {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 2,
                           "learning_rate": 5e-3, "lr_scheduler_type": "linear", "warmup_steps": 1, "dataloader_num_workers": 0},
              "custom": {"object_ordering": "random"}}  # random FN order: the trainer's own RNG must be restored too

    full_cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes, tmp_path / "a", **common)
    full = build_trainer(full_cfg)
    full.train()
    ref = losses(full)
    ckpt = Path(full_cfg.training.args["output_dir"]) / "checkpoint-2"
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "scheduler.pt").exists() and list(ckpt.glob("rng_state*.pth"))
    assert (ckpt / "tokenizer.json").exists() and (ckpt / "processor_config.json").exists()  # processor saved too
    assert (ckpt / "trainer_rollout_rng.json").exists()

    resumed_cfg = make_cfg(tiny_model_dirs["qwen3_vl"], shapes, tmp_path / "b",
                           **{**common, "training": {**common["training"], "resume_from_checkpoint": str(ckpt)}})
    resumed = build_trainer(resumed_cfg)
    assert resumed.args.resume_from_checkpoint == str(ckpt)
    calls = []
    orig = resumed.compute_loss
    resumed.compute_loss = lambda *a, **k: (calls.append(resumed.state.global_step), orig(*a, **k))[1]
    resumed.train(resume_from_checkpoint=resumed.args.resume_from_checkpoint)  # exactly as src.sft.run does
    got = losses(resumed)
    assert calls == [2, 3], calls  # continued at global step 2: only steps 3 and 4 were trained
    assert sorted(got) == [1, 2, 3, 4]  # log_history of steps 1-2 comes from the checkpoint's trainer_state.json
    assert resumed.state.global_step == 4
    for step in (3, 4):
        assert got[step]["learning_rate"] == pytest.approx(ref[step]["learning_rate"], rel=1e-6)
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4, abs=1e-5), (step, got[step]["loss"], ref[step]["loss"])
        for k in ("loss/ce", "loss/coord", "rollout/fn_appended", "rollout/valid_pred_objects"):
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-4, abs=1e-5), (step, k)
    # same final weights
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), n

    from src.models.loading import load_model_and_processor

    load_model_and_processor(ckpt)  # a checkpoint is itself a loadable model directory
    json.loads((ckpt / "trainer_state.json").read_text())
