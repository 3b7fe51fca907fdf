"""Real data parallelism under torchrun on CPU (reliability issue, item 1).

Without ``use_cpu`` accelerate leaves a CPU-only multi-process run undistributed: every rank trains its
own copy on its shard and gradients are never averaged. The launcher makes such runs DDP
over gloo; these tests assert the property itself: 2 ranks x B samples per step end with the SAME
weights, losses and stage-2 counters as 1 process x 2B samples.

"Relative difference" of two weight sets = the largest per-tensor ``||a - b|| / ||a||``. Training moves
every tensor by > 1e-3 of its norm in these runs, so a bound of 1e-5 cannot hold for copies that were
trained apart (each rank on half the data), only for gradients averaged across ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tests.test_end_to_end import ROOT, free_port, run, train_logs

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5


def train(assets, name: str, variant: str, per_device: int, nproc: int, normalization: str = "sample",
          training: dict | None = None, rollout: dict | None = None, model: dict | None = None,
          launcher: Path | None = None) -> tuple[Path, str]:
    """Train 3 optimizer steps of ``per_device * nproc`` samples each; returns (output dir, stdout).
    ``training`` / ``rollout`` / ``model``: more ``training.*`` / ``custom.extra.rollout_matching.*`` /
    ``model.*`` keys; ``launcher``: a script run instead of ``-m src.sft``."""
    root = assets["root"]
    smoke = "rollout_matching_tiny.yaml" if variant == "rollout_matching_sft" else "sft_tiny.yaml"
    cfg = {
        "extends": str(ROOT / "configs" / "smoke" / smoke),
        "model": {"model_name_or_path": str(assets["model"]), "build_tiny": None, **(model or {})},
        "custom": {"train_jsonl": str(root / "shapes" / "train.jsonl"), "val_jsonl": None, "shapes_data": None,
                   "extra": {"rollout_matching": {"loss_normalization": normalization, **(rollout or {})}}},
        "training": {"output_dir": str(root / name), "per_device_train_batch_size": per_device, "max_steps": 3,
                     "learning_rate": 1e-3, "report_to": [], **(training or {})},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    entry = [str(launcher)] if launcher else ["-m", "src.sft"]
    if nproc == 1:
        cmd = [sys.executable, *entry, "--config", str(path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
               *entry, "--config", str(path)]
    return root / name, run(cmd).stdout


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model.safetensors")


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / a[k].double().norm()) for k in a if a[k].norm() > 0)


@pytest.mark.parametrize("variant, normalization", [("sft", "sample"), ("rollout_matching_sft", "sample"), ("rollout_matching_sft", "token")])
def test_two_ranks_train_like_one_process_with_the_global_batch(ddp_assets, one_process_runs, variant, normalization):
    """Stage 1, stage 2 and stage 2 with ``loss_normalization: token`` (the step's supervised positions
    counted over both ranks before the first backward)."""
    one, out1 = one_process_runs(variant, normalization)
    two, out2 = train(ddp_assets, f"{variant}_{normalization}_2x2", variant, per_device=2, nproc=2, normalization=normalization)
    assert "[parallel] single process on cpu" in out1
    assert "[parallel] DDP over gloo, 2 processes (CPU)" in out2

    assert_trains_like(one, two, ddp_assets["model"], f"{variant} ({normalization})")
    for h in train_logs(two):
        counters = [k for k in h if k.startswith("rollout/")]
        assert (variant == "sft") == (not counters)
        if counters:
            assert h["rollout/samples"] == 4 and h["rollout/new_tokens_mean"] > 0


def assert_trains_like(one: Path, two: Path, start: Path, label: str) -> None:
    """Run ``two`` ended with the weights of run ``one`` (largest per-tensor relative L2 <= TOLERANCE, while
    training moved every tensor from ``start``'s far more than that) and logged the same losses, token
    counts and stage-2 counters (sums over ranks) at every step."""
    w1, w2, w0 = weights(one), weights(two), weights(start)
    moved = min(float((w1[k].double() - w0[k].double()).norm() / w1[k].double().norm()) for k in w1 if w1[k].norm() > 0)
    diff = relative_difference(w1, w2)
    print(f"\n{label}: relative difference 2x2 vs 1x4 = {diff:.2e} (smallest relative change by training {moved:.2e})")
    assert moved > 100 * TOLERANCE
    assert diff <= TOLERANCE

    logs1, logs2 = train_logs(one), train_logs(two)
    assert [h["step"] for h in logs1] == [h["step"] for h in logs2] == [1, 2, 3]
    for h1, h2 in zip(logs1, logs2):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
        for k in ("loss/ce", "loss/coord", "tokens/ce", "tokens/coord"):
            assert h2[k] == pytest.approx(h1[k], rel=1e-5), k
        for k in sorted(k for k in h1 if k.startswith("rollout/")):
            assert h2[k] == pytest.approx(h1[k], rel=1e-9, abs=1e-9), (k, h1[k], h2[k])


def test_a_multi_process_run_without_data_parallelism_is_refused(monkeypatch):
    """Belt and braces: should accelerate ever leave a multi-process run undistributed, the launcher
    stops instead of letting each rank train its own copy."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from src.config.loader import ConfigError
    from src.sft import check_data_parallel

    fake = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1, device="cpu"),
                           args=SimpleNamespace(deepspeed=None, fsdp_plugin_args=None))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert check_data_parallel(fake) == "single process on cpu"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="2 processes were launched but accelerate set up no data parallelism"):
        check_data_parallel(fake)


def test_use_cpu_false_with_several_cpu_processes_is_refused(monkeypatch):
    from src.config.loader import ConfigError, config_from_dict
    from src.sft import training_arguments

    cfg = config_from_dict({"model": {"model_name_or_path": "m"}, "custom": {"train_jsonl": "t.jsonl"},
                            "training": {"use_cpu": False, "report_to": []}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="training.use_cpu: false with 2 processes"):
        training_arguments(cfg)
