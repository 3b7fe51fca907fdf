"""The scale path on CPU (issue 16): DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 under ``torchrun --nproc_per_node 2``.

Asserted on the properties themselves:

* 2 ranks x 2 samples per step under each mode end with the SAME weights (largest per-tensor relative L2
  <= 1e-5), losses and stage-2 counters as 1 process x 4 samples (``tests/test_distributed.py``'s harness),
  for stage 1 and stage 2 (greedy). The run's own ``[parallel]`` and ``[sharding]`` lines must name the
  mode and show the parameters (ZeRO-3, FSDP2) or the fp32 optimizer partitions (ZeRO-2) split over the
  ranks: a silent fall-back to DDP fails here.
* The run directory and its checkpoints hold a normal model (the input model's tensor names, stock
  class); a ZeRO-3 / FSDP2 run resumed from checkpoint-2 continues with equal losses and weights.
* Generation under sharding (a worker outside the Trainer, both ``sharded_generation`` modes): every rank
  gets exactly the rollouts of the whole model although rank 0 generates 2 tokens and rank 1 40; the
  parameters are sharded again afterwards and training still works; ``checkpoint_tensors`` returns the
  loaded weights exactly. Negative control: generating on the sharded model without ``synced_gpus``
  breaks with those lengths.
* Through ``python -m src.sft``: ranks with very different rollout lengths finish under ZeRO-3
  (``gather_once``) and FSDP2 (``per_token``).

The first DeepSpeed start on a machine compiles ``deepspeed_shm_comm`` (~35 s, cached afterwards).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from src.bench.sharded import STEP_MODES
from tests.test_distributed import assert_trains_like, relative_difference, train, weights
from tests.test_end_to_end import ROOT, UNEVEN_LAUNCHER, free_port, run, train_logs

FSDP_EXAMPLE = ROOT / "configs" / "examples" / "qwen3_vl_8b_stage2_fsdp2.yaml"


def fsdp_keys() -> dict:
    """``training.fsdp`` / ``training.fsdp_config`` exactly as the shipped FSDP2 example sets them."""
    training = yaml.safe_load(FSDP_EXAMPLE.read_text())["training"]
    return {"fsdp": training["fsdp"], "fsdp_config": training["fsdp_config"]}


MODES = {
    "zero2": (STEP_MODES["zero2"], "DeepSpeed ZeRO-2, 2 processes"),
    "zero3": (STEP_MODES["zero3"], "DeepSpeed ZeRO-3, 2 processes"),
    "fsdp2": (fsdp_keys(), "FSDP2, 2 processes"),
}
SHARDING_RE = re.compile(r"^\[sharding\] (\w+): (\w+); this rank holds ([\d,]+) of ([\d,]+) parameter elements"
                         r"(?:, ([\d,]+) of ([\d,]+) fp32 optimizer-partition elements)?$", re.M)


def number(text: str | None) -> int:
    return int(text.replace(",", "")) if text else 0


class Runs:
    """Training runs shared by the tests of this module, each trained once on first use."""

    def __init__(self, assets, one_process_runs):
        self.assets, self.one_process_runs, self.done = assets, one_process_runs, {}

    def reference(self, variant: str) -> Path:
        return self.one_process_runs(variant)[0]

    def sharded(self, mode: str, variant: str) -> tuple[Path, str]:
        """2 ranks x 2 samples, 3 steps; stage-2 runs save checkpoint-2 (resumed below)."""
        key = (mode, variant)
        if key not in self.done:
            extra = dict(MODES[mode][0])
            if variant == "rollout_matching_sft":
                extra.update(save_strategy="steps", save_steps=2)
            self.done[key] = train(self.assets, f"{variant}_{mode}_2x2", variant, per_device=2, nproc=2, training=extra)
        return self.done[key]


@pytest.fixture(scope="module")
def runs(ddp_assets, one_process_runs):
    return Runs(ddp_assets, one_process_runs)


def tensor_names(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


def check_loadable(run_dir: Path, like: Path) -> None:
    """``run_dir`` holds one ``model.safetensors`` with exactly the tensor names of the model ``like``,
    and loads with the stock transformers class."""
    from src.models.loading import load_model_and_processor

    assert tensor_names(run_dir) == tensor_names(like), sorted(tensor_names(run_dir) ^ tensor_names(like))[:6]
    model, _ = load_model_and_processor(run_dir)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sft", "rollout_matching_sft"])
@pytest.mark.parametrize("mode", list(MODES))
def test_sharded_ranks_train_like_one_process_with_the_global_batch(runs, mode, variant):
    one = runs.reference(variant)
    two, out = runs.sharded(mode, variant)
    assert f"[parallel] {MODES[mode][1]}" in out

    # the wrapper and the sharding, as the run measured them on its parameters / optimizer
    (kind, wrapper, local, total, opt_local, opt_total), = SHARDING_RE.findall(out)
    local, total, opt_local, opt_total = map(number, (local, total, opt_local, opt_total))
    if mode == "zero2":  # whole parameters, fp32 master weights + Adam states split over the ranks
        assert (kind, wrapper) == ("zero2", "DeepSpeedEngine") and local == total
        assert 0.45 * opt_total < opt_local < 0.55 * opt_total
    else:  # parameters split over the ranks
        assert kind == mode and wrapper == ("DeepSpeedEngine" if mode == "zero3" else "FSDPQwen3VLForConditionalGeneration")
        assert 0.45 * total < local < 0.55 * total

    assert_trains_like(one, two, runs.assets["model"], f"{mode} {variant}")
    check_loadable(two, like=runs.assets["model"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero3", "fsdp2"])
def test_resume_under_sharding_continues_with_equal_losses(runs, mode):
    """checkpoint-2 of the 3-step stage-2 run is a complete, loadable checkpoint; resumed from it (in a
    fresh output directory), step 3 gives the same losses, counters and final weights."""
    from src.trainers.checkpoint import missing_parts

    full, _ = runs.sharded(mode, "rollout_matching_sft")
    ckpt = full / "checkpoint-2"
    assert missing_parts(ckpt) == []
    check_loadable(ckpt, like=runs.assets["model"])

    resumed_dir = runs.assets["root"] / f"resumed_{mode}"
    shutil.copytree(ckpt, resumed_dir / "checkpoint-2")
    extra = {**MODES[mode][0], "save_strategy": "steps", "save_steps": 2, "resume_from_checkpoint": True, "overwrite_output_dir": False}
    resumed, out = train(runs.assets, f"resumed_{mode}", "rollout_matching_sft", per_device=2, nproc=2, training=extra)
    assert resumed == resumed_dir and f"[resume] continuing from {resumed_dir / 'checkpoint-2'}" in out
    ref, got = {h["step"]: h for h in train_logs(full)}, {h["step"]: h for h in train_logs(resumed)}
    assert sorted(got) == [1, 2, 3]  # steps 1-2 come from the checkpoint's trainer state
    for k in ("loss", "learning_rate", "loss/ce", "loss/coord", "rollout/fn_appended", "rollout/valid_pred_objects"):
        assert got[3][k] == pytest.approx(ref[3][k], rel=1e-6, abs=1e-9), k
    assert relative_difference(weights(full), weights(resumed)) <= 1e-6


# ------------------------------------------------------------------------- generation under sharding

GENERATION_WORKER = '''
import json, os, sys
sys.path.insert(0, {root!r})
kind, model_dir, out = sys.argv[1:4]
import torch
import torch.distributed as dist
from src.bench.sharded import init_gloo, sample_prompts, shard_model
from src.models.loading import load_model_and_processor
from src.models.sharded import prepared_for_generation, sharding_summary
from src.rollout.weights import checkpoint_tensors
from src.rollout.encoding import left_padded_prompts
from src.rollout.engine import DecodeSettings
from src.rollout.hf import HFEngine
from src.rollout.sharded import generate_rollouts
from src.rollout_matching.tokens import token_table

init_gloo(kind, timeout_s=20)  # a collective waiting for a rank that went elsewhere raises after 20 s
rank = dist.get_rank()
model, processor = load_model_and_processor(model_dir)
g = torch.Generator().manual_seed(0)
with torch.no_grad():  # larger weights than the tiny init: rollouts that are not one repeated token
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
loaded = {{n: p.detach().clone() for n, p in model.named_parameters()}}
table = token_table(processor.tokenizer)
prompts = sample_prompts(processor, 2, seed=rank)
engine = HFEngine(DecodeSettings(max_new_tokens=2 if rank == 0 else 40, decode_batch_size=2), eos_id=table.im_end_id,
                  pad_id=processor.tokenizer.pad_token_id, table=table)
res = {{"whole": [r.response_ids for r in engine.generate(model, prompts)]}}  # this rank alone, whole model
wrapped = shard_model(model, kind)
for mode in ("gather_once", "per_token"):
    res[mode] = [r.response_ids for r in generate_rollouts(engine, prompts, model=model, wrapped=wrapped, sharded_generation=mode)]
res["sharding_after"] = sharding_summary(wrapped).__dict__
full = {{n: t.clone() for n, t in checkpoint_tensors(wrapped)}}
res["iter_names"] = sorted(full) == sorted(loaded)
res["iter_max_abs_diff"] = max(float((full[n] - loaded[n]).abs().max()) for n in loaded)
model.train()  # one training step on the sharded model after both generations
batch = left_padded_prompts(prompts, processor.tokenizer.pad_token_id)
loss = model(**batch, labels=batch["input_ids"]).loss
if kind == "zero3":
    wrapped.backward(loss)
    wrapped.step()
else:
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
res["loss"] = float(loss)
res["moved"] = max(float((t - loaded[n]).abs().max()) for n, t in checkpoint_tensors(wrapped))
with open(f"{{out}}.{{rank}}.json", "w") as f:
    json.dump(res, f)
dist.barrier()
# negative control: the sharded model WITHOUT synced_gpus, rank 0 stopping after 2 tokens, rank 1 after 40
model.eval()
try:
    with torch.no_grad(), prepared_for_generation(wrapped, gather_once=False):
        engine.generate(model, prompts, synced_gpus=False)
    dist.barrier()
    outcome = "completed"
except RuntimeError as e:
    outcome = "raised: " + str(e).splitlines()[0]
with open(f"{{out}}.control.{{rank}}", "w") as f:
    f.write(outcome)
os._exit(0)  # the process group is broken after the control
'''


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zero3", "fsdp2"])
def test_generation_under_sharding_with_very_different_lengths_per_rank(tiny_model_dirs, tmp_path, kind):
    worker = tmp_path / "worker.py"
    worker.write_text(GENERATION_WORKER.format(root=str(ROOT)))
    out = tmp_path / kind
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(worker), kind, str(tiny_model_dirs["qwen3_vl"]), str(out)], timeout=600)
    results = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1)]
    for rank, res in enumerate(results):
        n = 2 if rank == 0 else 40
        assert [len(ids) for ids in res["whole"]] == [n, n]  # no early stop: the lengths really differ
        assert len(set(res["whole"][0])) > 1  # not one repeated token
        assert res["gather_once"] == res["whole"] and res["per_token"] == res["whole"]
        after = res["sharding_after"]
        assert after["kind"] == kind and 0.45 * after["total_params"] < after["local_params"] < 0.55 * after["total_params"]
        assert res["iter_names"] and res["iter_max_abs_diff"] == 0.0
        assert res["loss"] == res["loss"] and res["moved"] > 0  # a finite loss; the step changed the weights
    controls = [Path(f"{out}.control.{r}").read_text() for r in (0, 1)]
    assert any(c.startswith("raised") for c in controls), controls


@pytest.mark.slow
@pytest.mark.parametrize("mode, generation", [("zero3", "gather_once"), ("fsdp2", "per_token")])
def test_torchrun_sharded_ranks_with_very_different_rollout_lengths(ddp_assets, mode, generation):
    """Through the launcher: rank 0 generates 2 tokens per rollout, rank 1 60; every step finishes."""
    launcher = ddp_assets["root"] / "uneven_launcher.py"
    launcher.write_text(UNEVEN_LAUNCHER.format(root=str(ROOT)))
    extra = {**MODES[mode][0], "max_steps": 2}
    out_dir, out = train(ddp_assets, f"uneven_{mode}", "rollout_matching_sft", per_device=1, nproc=2, training=extra, launcher=launcher,
                         rollout={"sharded_generation": generation})
    assert f"[parallel] {MODES[mode][1]}" in out
    logs = train_logs(out_dir)
    assert len(logs) == 2 and all(h["rollout/samples"] == 2 for h in logs)
    assert all(h["rollout/new_tokens_mean"] > 20 for h in logs)  # (2 + 60) / 2 when neither row ended early


@pytest.mark.slow
def test_lora_under_zero3_saves_the_adapter_and_a_merged_model(ddp_assets):
    """LoRA with ZeRO-3: the adapter is saved from the partitioned model, and the merged copy (made on
    rank 0 from the saved adapter and the base model: this rank holds only shards) equals base +
    alpha / r * B @ A on exactly the adapted weights. (Coord-row training, peft's trainable tokens,
    cannot run under ZeRO-3 without CUDA: ``train_coord_rows: false`` here.)"""
    from safetensors.torch import load_file

    extra = {**MODES["zero3"][0], "max_steps": 2}
    out_dir, out = train(ddp_assets, "lora_zero3", "rollout_matching_sft", per_device=1, nproc=2, training=extra,
                         model={"lora": {"enabled": True, "r": 4, "alpha": 8, "train_coord_rows": False}})
    assert f"[parallel] {MODES['zero3'][1]}" in out and "[sharding] zero3: DeepSpeedEngine" in out
    adapter = load_file(out_dir / "adapter_model.safetensors")
    base, merged = weights(ddp_assets["model"]), weights(out_dir / "merged")
    assert merged.keys() == base.keys()
    prefix = "base_model.model."
    adapted = {k[len(prefix):].replace(".lora_A.weight", ".weight") for k in adapter if k.endswith("lora_A.weight")}
    assert adapted and max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0  # trained
    for name, w in base.items():
        if name in adapted:
            stem = prefix + name.removesuffix(".weight")
            delta = 8 / 4 * adapter[f"{stem}.lora_B.weight"].double() @ adapter[f"{stem}.lora_A.weight"].double()
            assert torch.allclose(merged[name].double(), w.double() + delta, atol=1e-6), name
        else:
            assert torch.equal(merged[name], w), name


# ------------------------------------------------------------------------------------- unit level


def test_accelerate_still_ignores_fsdp_for_cpu_processes_and_the_patch_corrects_it():
    """accelerate 1.15 turns an FSDP plugin into DistributedType.FSDP only for GPU-like backends; for CPU
    processes it stays MULTI_CPU (the silent DDP fall-back). ``src.utils.parallel.fsdp_on_cpu`` corrects
    that in one place. The first half FAILS once accelerate changes this: then remove the patch."""
    script = '''
import os, sys
sys.path.insert(0, {root!r})
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
from types import SimpleNamespace
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import FullyShardedDataParallelPlugin
import src.utils.parallel as parallel
plugin = lambda: FullyShardedDataParallelPlugin(fsdp_version=2)
print("stock", Accelerator(cpu=True, fsdp_plugin=plugin()).distributed_type)
AcceleratorState._reset_state(reset_partial_state=False)
parallel.cpu_processes = lambda: True  # this check runs in one process; the patch acts for several
with parallel.fsdp_on_cpu(SimpleNamespace(fsdp_plugin_args={{"fsdp_version": 2}})):
    acc = Accelerator(cpu=True, fsdp_plugin=plugin())
print("patched", acc.distributed_type, acc.state.fsdp_plugin is not None)
'''
    r = subprocess.run([sys.executable, "-c", script.format(root=str(ROOT), port=free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stock DistributedType.MULTI_CPU" in r.stdout, r.stdout
    assert "patched DistributedType.FSDP True" in r.stdout, r.stdout


def test_fsdp1_on_cpu_processes_is_refused_before_the_model_loads(monkeypatch):
    from types import SimpleNamespace

    import src.utils.parallel as parallel
    from src.config.loader import ConfigError

    monkeypatch.setattr(parallel, "cpu_processes", lambda: True)
    with pytest.raises(ConfigError, match="training.fsdp_config: FSDP1 cannot run on CPU processes"):
        with parallel.fsdp_on_cpu(SimpleNamespace(fsdp_plugin_args={"fsdp_version": 1})):
            pass
    monkeypatch.setattr(parallel, "cpu_processes", lambda: False)  # GPUs: nothing touched
    with parallel.fsdp_on_cpu(SimpleNamespace(fsdp_plugin_args={"fsdp_version": 1})):
        pass


def test_a_sharded_run_that_got_another_mode_is_refused(monkeypatch):
    """``training.deepspeed`` / ``training.fsdp`` asked for, but accelerate set up DDP: stop, naming the key."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from src.config.loader import ConfigError
    from src.sft import check_data_parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, device="cpu")
    for key, args in (("deepspeed", SimpleNamespace(deepspeed="zero3.json", fsdp_plugin_args=None, ddp_backend="gloo")),
                      ("fsdp", SimpleNamespace(deepspeed=None, fsdp_plugin_args={"fsdp_version": 2}, ddp_backend="gloo"))):
        with pytest.raises(ConfigError, match=f"training.{key} is set but accelerate set up DDP over gloo"):
            check_data_parallel(SimpleNamespace(accelerator=acc, args=args))
    plain = SimpleNamespace(deepspeed=None, fsdp_plugin_args=None, ddp_backend="gloo")
    assert check_data_parallel(SimpleNamespace(accelerator=acc, args=plain)) == "DDP over gloo, 2 processes (CPU)"


def test_only_the_weight_conversions_loading_used_are_kept():
    """Under ZeRO-3 transformers kept every known key renaming, used or not, and saving reverted them all
    (``model.language_model.model.*``); the loader keeps the used ones, as a normal load does."""
    from types import SimpleNamespace

    from src.models.loading import keep_used_weight_conversions

    used, unused = SimpleNamespace(was_used=lambda: True), SimpleNamespace(was_used=lambda: False)
    model = SimpleNamespace(_weight_conversions=[unused, used, unused])
    keep_used_weight_conversions(model)
    assert model._weight_conversions == [used]
    bare = SimpleNamespace()
    keep_used_weight_conversions(bare)  # versions without the attribute: nothing to do
    assert not hasattr(bare, "_weight_conversions")


def test_whole_parameters_pass_through_the_sharding_helpers(tiny_loaded):
    """Without sharding: nothing is gathered, ``checkpoint_tensors`` is ``named_parameters`` (tied once)."""
    from src.models.sharded import full_shape, prepared_for_generation, sharding_of, sharding_summary
    from src.rollout.weights import checkpoint_tensors

    model, _ = tiny_loaded["qwen3_vl"]
    assert sharding_of(model) is None
    got = list(checkpoint_tensors(model))
    assert [n for n, _ in got] == [n for n, _ in model.named_parameters()]
    assert all(torch.equal(t, p) for (_, t), (_, p) in zip(got, model.named_parameters()))
    s = sharding_summary(model)
    assert (s.kind, s.local_params) == ("replicated", s.total_params) and s.total_params == sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    assert full_shape(emb) == emb.shape
    with prepared_for_generation(model, gather_once=True):
        pass


def test_deepspeed_configs_gather_the_full_model_on_save():
    """The shipped ZeRO configs leave batch sizes, accumulation and clipping to the Trainer ("auto"), and
    ZeRO-3 writes the whole model at every save (a loadable run directory and checkpoints)."""
    for stage in (2, 3):
        cfg = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
        assert cfg["zero_optimization"]["stage"] == stage
        for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert cfg[k] == "auto", k
    assert json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_gathered_state_dict_is_saved_with_tied_weights_once(tiny_loaded, tmp_path):
    """ZeRO-1/2 and FSDP2 hand the save one copy per parameter name; ``save_pretrained`` finds tied weights
    by shared storage and wrote the embeddings twice (``lm_head.weight``). Aliased again, the saved
    tensors are the model's usual ones."""
    from src.models.sharded import alias_tied_parameters

    model, _ = tiny_loaded["qwen3_vl"]
    copies = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "copies", state_dict=copies)
    model.save_pretrained(tmp_path / "aliased", state_dict=alias_tied_parameters(copies, model))
    model.save_pretrained(tmp_path / "plain")
    assert tensor_names(tmp_path / "copies") == tensor_names(tmp_path / "plain") | {"lm_head.weight"}  # the defect
    assert tensor_names(tmp_path / "aliased") == tensor_names(tmp_path / "plain")
