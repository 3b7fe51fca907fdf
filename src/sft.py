"""Launch a training run from YAML.

    python -m src.sft --config configs/demo/stage1_shapes.yaml [--base_config base.yaml] [section.key=value ...]
    torchrun --nproc_per_node 4 -m src.sft --config configs/rollout_matching_sft_template.yaml training.learning_rate=3e-5

Reads top to bottom: validate config -> prepare data/model if the config asks -> load records ->
load model + processor -> build the trainer variant -> train -> save a loadable run directory.
Bad input (config, data, model dir) ends with ONE line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from src.config.loader import ConfigError, gradient_accumulation_for, load_config, to_dict
from src.config.schema import Config
from src.data.contract import DataError, load_jsonl
from src.models.loading import ModelLoadError
from src.utils.parallel import cpu_processes, dist_env, fsdp_on_cpu, start_deepspeed_comm
from src.utils.runtime import keep_freed_memory

EXIT_BAD_INPUT = 2
COUNTER_TOTALS = {
    "rollout/parse_dropped_invalid", "rollout/parse_truncated", "rollout/valid_pred_objects", "rollout/matched_for_supervision",
    "rollout/excluded_from_supervision", "rollout/fn_appended", "rollout/gating_rejections", "rollout/gt_objects", "rollout/samples",
}


def wait_for(path: Path, what: str, timeout_s: float = 1800.0) -> None:
    """Non-zero local ranks wait until local rank 0 has produced ``path`` (written atomically)."""
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for local rank 0 to create {what} at {path}")
        time.sleep(0.5)


def prepare_assets(cfg: Config) -> None:
    """Build the tiny model / synthetic data when the config asks for them and they are absent."""
    _, local_rank, _ = dist_env()
    model_dir = Path(cfg.model.model_name_or_path)
    if cfg.model.build_tiny is not None and not (model_dir / "config.json").exists():
        if local_rank == 0:
            from src.models.build_tiny import build_tiny_model_dir

            b = cfg.model.build_tiny
            print(f"[setup] building tiny {b.arch} model ({b.preset} preset, seed {b.seed}) at {model_dir}", flush=True)
            build_tiny_model_dir(model_dir, arch=b.arch, seed=b.seed, preset=b.preset)
        else:
            wait_for(model_dir / "config.json", "the tiny model")
    out = shapes_to_generate(cfg)
    if out is not None:
        sd = cfg.custom.shapes_data
        if local_rank == 0:
            from src.data.make_shapes import make_shapes

            print(f"[setup] generating shapes data ({sd.num_train} train / {sd.num_val} val) in {out}", flush=True)
            make_shapes(out, num_train=sd.num_train, num_val=sd.num_val, seed=sd.seed, image_size=sd.image_size,
                        min_shapes=sd.min_shapes, max_shapes=sd.max_shapes, kinds=tuple(sd.kinds), verbose=True)
        else:
            wait_for(out / "val.jsonl", "the shapes data")


SHAPES_OUTPUTS = {"train.jsonl", "val.jsonl", "images"}


def shapes_to_generate(cfg: Config) -> Path | None:
    """The folder ``custom.shapes_data`` should generate into, or None when there is nothing to do.

    The generator fills only the paths it owns: ``DIR/train.jsonl`` + ``DIR/val.jsonl`` (+ ``DIR/images``),
    when they are missing and DIR holds nothing else. When the configured train / val files exist (your
    own data, e.g. in a config that extends the demo), the setting is simply unused. A missing file the
    generator cannot own is a one-line error naming the fix."""
    sd = cfg.custom.shapes_data
    if sd is None:
        return None
    train = Path(cfg.custom.train_jsonl)
    val = Path(cfg.custom.val_jsonl) if cfg.custom.val_jsonl else None
    missing = [p for p in (train, val) if p is not None and not p.exists()]
    if not missing:
        return None
    out = train.parent
    fix = "point custom.train_jsonl / custom.val_jsonl at existing files, or set custom.shapes_data: null to use your own data"
    if train.name != "train.jsonl" or val is None or val != out / "val.jsonl":
        raise ConfigError(f"custom.shapes_data: {missing[0]} does not exist, and the shapes generator only writes DIR/train.jsonl "
                          f"+ DIR/val.jsonl; {fix}")
    others = sorted(p.name for p in out.iterdir() if p.name not in SHAPES_OUTPUTS and not p.name.startswith(".")) if out.is_dir() else []
    if others:
        raise ConfigError(f"custom.shapes_data: {missing[0]} does not exist and {out} holds other files ({', '.join(others[:3])}); "
                          f"the shapes generator only fills a folder of its own; {fix}")
    return out


def training_arguments(cfg: Config, resume: str | None = None):
    """``transformers.TrainingArguments`` from ``training.*`` (+ effective batch size, DDP over gloo on CPU,
    ``resume_from_checkpoint`` resolved by :func:`resolve_run_dir`)."""
    from transformers import TrainingArguments

    _, _, world_size = dist_env()
    args = dict(cfg.training.args)
    args["resume_from_checkpoint"] = resume
    args["gradient_accumulation_steps"] = gradient_accumulation_for(cfg, world_size)
    if cpu_processes():
        # Without use_cpu, accelerate reports DistributedType.NO on a CPU-only machine: every rank would
        # train its own copy on its shard and gradients would never be averaged. With it,
        # the model is wrapped in DDP over gloo.
        if args.get("use_cpu") is False:
            raise ConfigError(f"training.use_cpu: false with {world_size} processes and no GPU would train {world_size} "
                              "independent copies; remove the key (the launcher sets use_cpu: true for CPU data parallelism)")
        args["use_cpu"] = True
        args.setdefault("ddp_backend", "gloo")  # setting it in a 1-process run errors
    if args.get("report_to") == ["tensorboard"]:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            args["report_to"] = "none"
    try:
        return TrainingArguments(**args)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"training: {str(e).splitlines()[0]}") from None


def resolve_run_dir(cfg: Config) -> str | None:
    """One output directory, one run; returns the checkpoint to resume from (None: a fresh run).

    Checked before anything loads or is written:
    * ``resume_from_checkpoint: true``: the newest COMPLETE ``checkpoint-N`` of ``output_dir``
      (incomplete ones, e.g. copied half or written by an older version, are skipped with a note);
    * ``resume_from_checkpoint: DIR``: DIR must be a complete checkpoint;
    * a fresh run into a non-empty ``output_dir`` stops unless ``training.overwrite_output_dir: true``
      (the previous run's files are then removed by :func:`clear_previous_run` once everything else
      has been validated).
    """
    from src.trainers.checkpoint import missing_parts, newest_complete

    out = Path(cfg.training.args["output_dir"])
    resume = cfg.training.args.get("resume_from_checkpoint")
    if resume is True:
        ckpt, skipped = newest_complete(out)
        for s in skipped:
            print(f"[resume] skipping incomplete {s} (missing {', '.join(missing_parts(s))})", flush=True)
        if ckpt is None:
            raise ConfigError(f"training.resume_from_checkpoint: true, but {out} holds no complete checkpoint-N; "
                              "start a fresh run (resume_from_checkpoint: null) or name a checkpoint directory")
        return str(ckpt)
    if isinstance(resume, str) and resume:
        missing = missing_parts(Path(resume))
        if missing:
            raise ConfigError(f"training.resume_from_checkpoint: {resume} is not a complete checkpoint (missing {', '.join(missing)}); "
                              "name a complete checkpoint-N, or set resume_from_checkpoint: true for the newest complete one")
        return resume
    if out.is_dir() and not cfg.training.overwrite_output_dir:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ConfigError(f"training.output_dir: {out} already holds another run ({shown}); set training.resume_from_checkpoint: true "
                              "to continue it, training.overwrite_output_dir: true to replace it, or choose another output_dir")
    return None


PREVIOUS_RUN_FILES = ("trainer_state.json", "summary.json", "rollouts.jsonl")


def clear_previous_run(out: Path) -> list[str]:
    """``overwrite_output_dir``: delete the previous run's checkpoints (complete or not) and the files a
    reader would take for this run's (``PREVIOUS_RUN_FILES``). Other files are overwritten by the new
    run. Returns the names removed."""
    import shutil

    from src.trainers.checkpoint import checkpoint_step

    removed = []
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        stem = p.name.lstrip(".").removesuffix(".partial").removesuffix(".old")
        if p.is_dir() and checkpoint_step(Path(stem)) is not None:
            shutil.rmtree(p)
        elif p.is_file() and p.name in PREVIOUS_RUN_FILES:
            p.unlink()
        else:
            continue
        removed.append(p.name)
    return removed


def parallel_mode(trainer) -> str:
    """How this run trains, in words, from accelerate's view of it (logged at start, tested)."""
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    kind = acc.distributed_type
    n = acc.num_processes
    if kind == DistributedType.NO:
        return f"single process on {acc.device}"
    if kind == DistributedType.DEEPSPEED:
        stage = acc.state.deepspeed_plugin.zero_stage if acc.state.deepspeed_plugin else "?"
        return f"DeepSpeed ZeRO-{stage}, {n} processes"
    if kind == DistributedType.FSDP:
        version = getattr(acc.state.fsdp_plugin, "fsdp_version", 1)
        return f"FSDP{version}, {n} processes"
    backend = trainer.args.ddp_backend or (torch_dist_backend() or "default")
    where = "CPU" if kind == DistributedType.MULTI_CPU else kind.value.removeprefix("MULTI_")
    return f"DDP over {backend}, {n} processes ({where})"


def torch_dist_backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def check_data_parallel(trainer) -> str:
    """The parallel mode; a multi-process run that accelerate did not make data parallel is an error
    (each rank would silently train its own copy), and so is a run that asked for DeepSpeed or FSDP and
    got another mode (e.g. DDP: every rank would hold the whole model and optimizer)."""
    mode = parallel_mode(trainer)
    _, _, world_size = dist_env()
    if world_size > 1 and mode.startswith("single process"):
        raise ConfigError(f"training: {world_size} processes were launched but accelerate set up no data parallelism ({mode}); "
                          "check training.use_cpu / ddp_backend and the accelerate config")
    args = trainer.args
    for key, asked, want in (("deepspeed", args.deepspeed, "DeepSpeed"), ("fsdp", getattr(args, "fsdp_plugin_args", None) is not None, "FSDP")):
        if asked and not mode.startswith(want):
            raise ConfigError(f"training.{key} is set but accelerate set up {mode}; check the accelerate config and the launcher")
    return mode


def check_images_open(records) -> None:
    """Open every record's image header once (cheap: no pixel decoding), so a missing or unreadable
    file, or one whose size differs from the record's ``width``/``height``, is refused before any model
    loads, naming the JSONL file:line. Images that break later (during training) still surface as a
    one-line DataError from the collator."""
    from src.data.images import check_record_images

    check_record_images(records)


def load_records(cfg: Config):
    c = cfg.custom
    train, tstats = load_jsonl(c.train_jsonl, on_invalid=c.on_invalid_record, limit=c.max_train_samples, keep_eval=False)
    if not train:
        raise DataError(f"{c.train_jsonl}: no usable records")
    val, vstats = [], None
    if c.val_jsonl:
        val, vstats = load_jsonl(c.val_jsonl, on_invalid=c.on_invalid_record, limit=c.max_val_samples, keep_eval=False)
    check_images_open(train)
    check_images_open(val)
    if dist_env()[0] == 0:
        for path, stats in ((c.train_jsonl, tstats), (c.val_jsonl, vstats)):
            if stats is not None and stats.skipped:
                print(f"[data] skipped {stats.skipped} invalid line(s) of {path} (custom.on_invalid_record: skip); "
                      f"first: {stats.skip_reasons[0]}", flush=True)
    return train, val


def lora_spec(lora) -> dict | None:
    """``model.lora`` as keyword arguments of :class:`src.models.loading.LoraSpec` (None when disabled)."""
    if not lora.enabled:
        return None
    spec = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "train_coord_rows": lora.train_coord_rows}
    if lora.target_modules is not None:
        spec["target_modules"] = tuple(lora.target_modules)
    return spec


def build_trainer(cfg: Config):
    """Everything up to (not including) ``trainer.train()``. Returns the trainer."""
    from src.models.loading import load_model_and_processor
    from src.trainers.data import RecordDataset
    from src.trainers.registry import get_trainer_class

    trainer_cls = get_trainer_class(cfg.custom.trainer_variant)
    resume = resolve_run_dir(cfg)
    targs = training_arguments(cfg, resume)  # validated before any model loads
    start_deepspeed_comm(targs)  # CPU processes + DeepSpeed: before the model loads (ZeRO-3 partitions it while loading)
    prepare_assets(cfg)
    train, val = load_records(cfg)
    m = cfg.model
    model, processor = load_model_and_processor(
        m.model_name_or_path, add_coord_tokens=m.add_coord_tokens, dtype=m.dtype, attn_implementation=m.attn_implementation,
        freeze_vision=m.freeze_vision, lora=lora_spec(m.lora), coord_init=cfg.custom.coord_tokens.init,
        min_pixels=m.min_pixels, max_pixels=m.max_pixels,
    )
    with fsdp_on_cpu(targs):  # CPU processes + FSDP2: accelerate's state says FSDP (see src/utils/parallel.py)
        trainer = trainer_cls(
            model=model, args=targs, train_dataset=RecordDataset(train), eval_dataset=RecordDataset(val) if val else None,
            data_collator=trainer_cls.make_collator(processor, cfg, targs.seed), run_config=cfg, processor=processor,
        )
    mode = check_data_parallel(trainer)
    if trainer.is_world_process_zero():
        print(f"[parallel] {mode}", flush=True)
    return trainer


def save_merged_lora(trainer, path: Path) -> Path:
    """With LoRA the run directory holds the adapter; also write the merged full model (+ processor) to
    ``path`` so that it can be used as ``model.model_name_or_path`` (e.g. stage 1 -> stage 2). Rank 0 only.
    The same merge and atomic write as ``python -m src.export``.

    Under ZeRO-3 / FSDP2 this rank holds shards of the base weights: the adapter the run just saved is
    merged into the base model loaded again, whole (as ``python -m src.export`` would load it)."""
    from src.models.checkpoints import merge_adapters, write_model_dir
    from src.models.sharded import loading_whole_models, sharding_of

    model = trainer.accelerator.unwrap_model(trainer.model)
    if sharding_of(model) is None:
        merged = merge_adapters(model)
    else:
        from src.models.loading import load_adapter_checkpoint

        m = trainer.run_config.model
        with loading_whole_models(getattr(trainer.args, "hf_deepspeed_config", None)):
            merged, _ = load_adapter_checkpoint(trainer.args.output_dir, coord_init=trainer.run_config.custom.coord_tokens.init,
                                                dtype=m.dtype, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
    return write_model_dir(merged, trainer.processor, path, overwrite=True)


def write_run_files(cfg: Config, output_dir: Path) -> None:
    import yaml

    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "resolved_config.yaml", "w", encoding="utf-8") as f:
        f.write(f"# resolved from: {', '.join(cfg.sources)}\n")
        if cfg.overrides:
            f.write(f"# command-line overrides (applied last): {' '.join(cfg.overrides)}\n")
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, allow_unicode=True)


def run(cfg: Config) -> dict:
    """Train per ``cfg``; returns a summary dict (also written to ``output_dir/summary.json``)."""
    t0 = time.time()
    trainer = build_trainer(cfg)
    out = Path(trainer.args.output_dir)
    resume = trainer.args.resume_from_checkpoint
    if trainer.is_world_process_zero():
        if resume is None and cfg.training.overwrite_output_dir and (removed := clear_previous_run(out)):
            print(f"[output] training.overwrite_output_dir: removed the previous run's {', '.join(removed)} from {out}", flush=True)
        if resume is not None:
            print(f"[resume] continuing from {resume}", flush=True)
        write_run_files(cfg, out)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # model + processor (processing_class): the directory is itself loadable
    summary = {"train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1), "global_step": trainer.state.global_step}
    if trainer.eval_dataset is not None:
        summary.update({k: round(v, 4) for k, v in trainer.evaluate().items()})
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    if train_logs:
        summary.update(loss_first=round(train_logs[0]["loss"], 4), loss_last=round(train_logs[-1]["loss"], 4))
        for k in ("loss/ce", "loss/coord"):
            if k in train_logs[-1]:
                summary[f"last_{k}"] = round(train_logs[-1][k], 4)
        # rollout counters are window sums: their total over the run
        for k in sorted({k for h in train_logs for k in h if k.startswith("rollout/") and k in COUNTER_TOTALS}):
            summary[f"total_{k}"] = sum(h.get(k, 0.0) for h in train_logs)
    if cfg.model.lora.enabled and trainer.is_world_process_zero():
        summary["merged_model_dir"] = str(save_merged_lora(trainer, out / "merged"))
    summary["wall_s"] = round(time.time() - t0, 1)
    if trainer.is_world_process_zero():
        trainer.save_state()  # trainer_state.json; its log_history includes the final evaluation
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[done] {cfg.custom.trainer_variant} -> {out}: " + ", ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    trainer.rollout_engine.close()  # a vLLM engine goes BEFORE the process group (shutdown_distributed)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.sft", description="Train a Qwen-VL detector (stage 1 SFT or stage 2 rollout-matching SFT) from YAML.")
    ap.add_argument("--config", required=True, help="YAML config (may use extends:)")
    ap.add_argument("--base_config", default=None, help="YAML merged under --config")
    ap.add_argument("--print_config", action="store_true", help="validate, print the resolved config and exit (loads no model)")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="override any config key, typed and validated like YAML (e.g. training.learning_rate=3e-5); applied last, in order")
    args = ap.parse_args(argv)
    keep_freed_memory()
    try:
        cfg = load_config(args.config, args.base_config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
            return 0
        run(cfg)
    except (ConfigError, DataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    shutdown_distributed()
    return 0


def shutdown_distributed() -> None:
    """Destroy the process group (torchrun runs) while the interpreter is fully alive.

    Left to interpreter finalization, Gloo's worker threads can abort the process ("terminate called
    without an active exception", SIGABRT) AFTER the run finished and saved: torchrun then reports the
    whole job as failed (seen in a 2-process CPU test; pytorch/pytorch#190489). Only on success: a
    rank that failed must not wait in a collective teardown for ranks that are still training."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
