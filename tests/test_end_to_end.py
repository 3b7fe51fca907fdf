"""End-to-end runs through the real entry points (marked slow; they run in CI too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dirs):
    """A tiny model dir and a small shapes set; even-numbered training images have NO objects."""
    from src.data.make_shapes import make_shapes

    root = tmp_path_factory.mktemp("e2e")
    make_shapes(root / "shapes", num_train=8, num_val=4, seed=1, image_size=64, min_shapes=1, max_shapes=2, kinds=("rectangle", "triangle"))
    lines = (root / "shapes" / "train.jsonl").read_text().splitlines()
    mixed = []
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if i % 2 == 0:
            rec["objects"] = []
        mixed.append(json.dumps(rec))
    (root / "shapes" / "train.jsonl").write_text("\n".join(mixed) + "\n")
    return {"root": root, "model": tiny_model_dirs["qwen3_vl"], "train": root / "shapes" / "train.jsonl", "val": root / "shapes" / "val.jsonl"}


def write_config(assets, name: str, variant: str, extra: dict | None = None) -> tuple[Path, Path]:
    out = assets["root"] / name
    cfg = {
        "extends": str(ROOT / "configs" / "smoke" / ("rollout_matching_tiny.yaml" if variant == "rollout_matching_sft" else "sft_tiny.yaml")),
        "model": {"model_name_or_path": str(assets["model"]), "build_tiny": None},
        "custom": {"train_jsonl": str(assets["train"]), "val_jsonl": str(assets["val"]), "shapes_data": None},
        "training": {"output_dir": str(out), "report_to": ["tensorboard"]},
    }
    if extra:
        from src.config.loader import merge

        cfg = merge(cfg, extra)
    path = assets["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, out


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\nSTDOUT:\n{r.stdout[-3000:]}\nSTDERR:\n{r.stderr[-5000:]}"
    return r


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_logs(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_stage1_through_python_m_src_sft(assets):
    cfg, out = write_config(assets, "stage1", "sft")
    run([sys.executable, "-m", "src.sft", "--config", str(cfg)])
    logs = train_logs(out)
    assert len(logs) == 4 and all(k in logs[0] for k in ("loss/ce", "loss/coord", "coord/vocab_mass", "coord/top1_acc"))
    assert (out / "resolved_config.yaml").exists() and (out / "summary.json").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "runs").rglob("*"))  # TensorBoard
    from src.models.loading import load_model_and_processor

    model, processor = load_model_and_processor(out)  # the run directory is itself a model
    assert len(processor.tokenizer) == 152669


def test_stage2_through_python_m_src_sft(assets):
    cfg, out = write_config(assets, "stage2", "rollout_matching_sft")
    run([sys.executable, "-m", "src.sft", "--config", str(cfg)])
    logs = train_logs(out)
    assert len(logs) == 4
    for k in ("rollout/parse_dropped_invalid", "rollout/parse_truncated", "rollout/valid_pred_objects",
              "rollout/matched_for_supervision", "rollout/excluded_from_supervision", "rollout/fn_appended",
              "rollout/gating_rejections", "loss/ce", "loss/coord", "loss/coord_prefix", "loss/coord_tail"):
        assert k in logs[0], k
    assert (out / "rollouts.jsonl").exists()
    evals = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_rollout_f1" in h]
    assert evals and 0.0 <= evals[-1]["eval_rollout_f1"] <= 1.0


@pytest.mark.parametrize("variant", ["sft", "rollout_matching_sft"])
def test_torchrun_two_processes_with_a_zero_gt_rank(assets, variant):
    """2 CPU processes (gloo); half the images have no GT, so some steps give a rank only zero-GT samples."""
    cfg, out = write_config(assets, f"ddp_{variant}", variant, {"training": {"per_device_train_batch_size": 1, "max_steps": 6}})
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "src.sft", "--config", str(cfg), "training.max_steps=4"], timeout=600)  # a command-line override, on every rank
    logs = train_logs(out)
    assert len(logs) == 4
    if variant == "rollout_matching_sft":
        assert all(h["rollout/samples"] == 2 for h in logs)  # one sample per rank, summed over both ranks
        assert sum(h["rollout/gt_objects"] for h in logs) >= 1
    else:
        assert all(h["tokens/ce"] > 0 for h in logs)


@pytest.mark.parametrize("outcome", ["success", "bad input"])
def test_launcher_destroys_the_process_group_only_after_a_successful_run(monkeypatch, outcome):
    """Left to interpreter shutdown, Gloo's threads sometimes aborted a finished torchrun job (SIGABRT,
    'terminate called without an active exception'): the launcher destroys the group itself, but only
    on success (a failed rank must not wait in a teardown for ranks still training)."""
    import torch.distributed as dist

    import src.sft as sft
    from src.data.contract import DataError

    def failing_run(cfg):
        raise DataError("x.jsonl:1: broken")

    monkeypatch.setattr(sft, "run", (lambda cfg: None) if outcome == "success" else failing_run)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        rc = sft.main(["--config", str(ROOT / "configs/smoke/sft_tiny.yaml")])
        assert rc == (0 if outcome == "success" else sft.EXIT_BAD_INPUT)
        assert dist.is_initialized() == (outcome != "success")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_stage2_with_lora_and_gradient_checkpointing_saves_a_loadable_merged_model(assets):
    cfg, out = write_config(assets, "lora_gc", "rollout_matching_sft", {
        "model": {"lora": {"enabled": True, "r": 4, "alpha": 8}},
        "training": {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}, "max_steps": 2},
    })
    run([sys.executable, "-m", "src.sft", "--config", str(cfg)])
    assert (out / "adapter_config.json").exists() and len(train_logs(out)) == 2
    from src.models.loading import load_model_and_processor

    model, processor = load_model_and_processor(out / "merged")
    assert not any("lora" in n for n, _ in model.named_parameters())


UNEVEN_LAUNCHER = '''
import dataclasses, os, sys
sys.path.insert(0, {root!r})
import src.rollout.hf as rollout

_init = rollout.HFEngine.__init__

def _uneven_init(self, settings, *args, **kwargs):
    # rank 0 stops after 2 new tokens, rank 1 generates 60: very different rollout and Y_train lengths
    n = 2 if int(os.environ.get("RANK", "0")) == 0 else 60
    _init(self, dataclasses.replace(settings, max_new_tokens=n), *args, **kwargs)

rollout.HFEngine.__init__ = _uneven_init
from src.sft import main
raise SystemExit(main(sys.argv[1:]))
'''


def test_torchrun_ranks_with_very_different_rollout_lengths(assets):
    """Rank 0 generates 2 tokens per rollout, rank 1 60 (and half the images have no GT): every step and
    the evaluation must complete on both ranks (a collective issued out of order would hang -> timeout)."""
    cfg, out = write_config(assets, "ddp_uneven", "rollout_matching_sft", {"training": {"per_device_train_batch_size": 1, "max_steps": 3}})
    launcher = assets["root"] / "uneven_launcher.py"
    launcher.write_text(UNEVEN_LAUNCHER.format(root=str(ROOT)))
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(launcher), "--config", str(cfg)], timeout=600)
    logs = train_logs(out)
    assert len(logs) == 3 and all(h["rollout/samples"] == 2 for h in logs)
    # mean new tokens over both ranks: (2 + 60) / 2 when neither row ended early
    assert any(h["rollout/new_tokens_mean"] > 20 for h in logs)
    assert any(h["rollout/hit_max_new_tokens"] >= 1 for h in logs)
