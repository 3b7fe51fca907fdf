"""Shared Trainer glue: the selective-logits teacher-forced forward, per-step metrics reduced across
ranks, and rollout evaluation (precision / recall / F1 of greedy rollouts on the val set)."""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import Trainer, TrainerCallback

from src.config.schema import Config
from src.data.images import load_image
from src.data.prompt import prompt_text
from src.losses.supervised import LossOutput, NonFiniteLogitsError, teacher_forced_losses
from src.models.selective import selected_logits
from src.models.sharded import ShardingSummary, alias_tied_parameters, sharding_summary
from src.rollout.backends import build_engine
from src.rollout.encoding import PromptEncoding, encode_prompt
from src.rollout.engine import Rollout
from src.rollout.sharded import generate_rollouts
from src.rollout_matching.tokens import token_table
from src.trainers.batches import MODEL_INPUT_KEYS
from src.trainers.metrics import StepMetrics, ratio
from src.utils.parallel import world

LOSS_SUM_KEYS = (
    "ce_sum", "ce_count", "coord_sum", "coord_count", "coord_prefix_sum", "coord_prefix_count",
    "coord_tail_sum", "coord_tail_count", "coord_soft_ce_sum", "coord_w1_sum", "coord_gate_sum",
    "coord_mass_sum", "coord_top1_sum", "coord_abs_err_sum",
)


class EngineWeightSync(TrainerCallback):
    """Tells an engine that holds its own copy of the weights (vLLM) when the policy changed: after every
    optimizer step, and when training begins (a resumed run has just loaded its checkpoint). The engine
    pushes the weights before its next rollout, so only steps that changed them cost a push."""

    def __init__(self, engine):
        self.engine = engine

    def on_train_begin(self, args, state, control, **kwargs):
        self.engine.mark_stale()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.engine.mark_stale()


class DetectionTrainer(Trainer):
    """Base for both variants. ``compute_loss`` returns a per-sample-mean loss (see
    :mod:`src.losses.supervised`); the Trainer divides it by the accumulation steps."""

    loss_is_scaled_for_ga = False
    extra_metric_keys: tuple[str, ...] = ()

    def __init__(self, *args: Any, run_config: Config, processor, **kwargs: Any):
        super().__init__(*args, processing_class=processor, **kwargs)
        self.run_config = run_config
        self.processor = processor
        self.table = token_table(processor.tokenizer)
        self._coord_ids = torch.as_tensor(self.table.coord_ids, dtype=torch.long)
        self.step_metrics = StepMetrics((*LOSS_SUM_KEYS, "samples", *self.extra_metric_keys))
        rm = run_config.rollout_matching
        self.rollout_engine = build_engine(rm, self.table, processor.tokenizer.pad_token_id, processor=processor, seed=self.args.seed,
                                           gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
        if self.rollout_engine.holds_own_weights:
            self.add_callback(EngineWeightSync(self.rollout_engine))
        self.sharding: ShardingSummary | None = None  # measured at the first training step

    # ------------------------------------------------------------------------- teacher-forced pass

    def supervised_forward(self, model, batch: dict, sources: list[str] | None = None, token_denominator: float | None = None) -> LossOutput:
        """ONE forward on the teacher-forced batch; logits only at supervised positions.

        NaN/inf logits stop the run with :class:`NonFiniteLogitsError` naming the optimizer step and the
        samples (their ``file:line`` when ``sources`` is given) — see docs/reliability.md."""
        mask = batch["supervised_mask"]
        inputs = {k: batch[k] for k in MODEL_INPUT_KEYS}
        logits = selected_logits(model, inputs, mask, use_cache=False)  # [N, V], rows in row-major (b, t) order of mask
        sample_idx = mask.nonzero(as_tuple=True)[0]
        try:
            return self._losses(logits, batch, mask, sample_idx, token_denominator)
        except NonFiniteLogitsError as e:
            who = ", ".join(f"sample {i}" + (f" ({sources[i]})" if sources and i < len(sources) else "") for i in e.samples)
            raise NonFiniteLogitsError(
                f"optimizer step {self.state.global_step + 1}: {e} -> {who}; "
                "the model produced NaN/inf (diverged weights or fp16 overflow): lower the learning rate, use bf16/fp32, "
                "or resume from an earlier checkpoint", e.samples) from None

    def _losses(self, logits, batch: dict, mask, sample_idx, token_denominator: float | None = None) -> LossOutput:
        c = self.run_config.custom.coord_soft_ce_w1
        rm = self.run_config.rollout_matching
        stage2 = self.run_config.custom.trainer_variant == "rollout_matching_sft"
        return teacher_forced_losses(
            logits, batch["ce_targets"][mask], batch["coord_bins"][mask], batch["coord_segment"][mask],
            sample_idx, mask.shape[0], self._coord_ids.to(logits.device),
            ce_weight=rm.ce_weight if stage2 else 1.0, coord_weight=rm.coord_weight if stage2 else 1.0,
            soft_ce_weight=c.soft_ce_weight, w1_weight=c.w1_weight, gate_weight=c.gate_weight,
            target_sigma=c.target_sigma, target_truncate=c.target_truncate, temperature=c.temperature,
            token_denominator=token_denominator,
        )

    def record_losses(self, out: LossOutput, num_samples: int) -> None:
        if self.model.training:
            self.step_metrics.add_many(out.sums)
            self.step_metrics.add("samples", num_samples)

    # ---------------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint (model + processor, optimizer, scheduler, scaler, RNG states, trainer
        state), written aside and renamed to ``checkpoint-<step>`` once every rank has written its part
        (:mod:`src.trainers.checkpoint`): a run killed during a save leaves no ``checkpoint-<step>`` that
        resuming would pick. The steps are the stock Trainer's, in its order, into the staging folder."""
        from transformers.trainer_callback import ExportableState
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

        from src.trainers.checkpoint import TRAINER_STATE, publish, staging_dir

        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_dir(final)
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # left by a save that was killed
        self.accelerator.wait_for_everyone()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(str(staging), _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))
        self.save_extra_state(staging)
        best = self.state.best_global_step
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best:
            best_dir = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best}"
            if best_dir.exists() or best == self.state.global_step:
                self.state.best_model_checkpoint = str(best_dir)
        if self.args.should_save:
            for cb in [cb for cb in [*self.callback_handler.callbacks, self.control] if isinstance(cb, ExportableState)]:
                name = type(cb).__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(str(staging / TRAINER_STATE))
        self.accelerator.wait_for_everyone()  # every rank's files are in the staging folder
        if self.args.should_save:
            publish(staging, final)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))
        if self.args.should_save:
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The stock save; a state dict gathered from DeepSpeed / FSDP gets its tied parameters aliased
        again, so the directory holds the model's usual tensors (:func:`src.models.sharded.alias_tied_parameters`)."""
        if state_dict is not None:
            state_dict = alias_tied_parameters(state_dict, self.model)
        super()._save(output_dir, state_dict=state_dict)

    def save_extra_state(self, checkpoint_dir: Path) -> None:
        """Hook: a variant's own state, written into the checkpoint before it is published."""

    # ------------------------------------------------------------------------------------ logging

    def derive_metrics(self, s: dict[str, float]) -> dict[str, float]:
        return {
            "loss/ce": ratio(s["ce_sum"], s["ce_count"]),
            "loss/coord": ratio(s["coord_sum"], s["coord_count"]),
            "loss/coord_prefix": ratio(s["coord_prefix_sum"], s["coord_prefix_count"]),
            "loss/coord_tail": ratio(s["coord_tail_sum"], s["coord_tail_count"]),
            "loss/coord_soft_ce": ratio(s["coord_soft_ce_sum"], s["coord_count"]),
            "loss/coord_w1": ratio(s["coord_w1_sum"], s["coord_count"]),
            "loss/coord_gate": ratio(s["coord_gate_sum"], s["coord_count"]),
            "coord/vocab_mass": ratio(s["coord_mass_sum"], s["coord_count"]),
            "coord/top1_acc": ratio(s["coord_top1_sum"], s["coord_count"]),
            "coord/abs_err_bins": ratio(s["coord_abs_err_sum"], s["coord_count"]),
            "tokens/ce": s["ce_count"],
            "tokens/coord": s["coord_count"],
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Train logs (they carry "loss") get our window metrics, reduced across ranks once. Every rank
        # reaches this call at the same step, so the collective is issued in the same order everywhere.
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs = {**logs, **self.derive_metrics(self.step_metrics.reduce(self.args.device))}
        super().log(logs, start_time)

    # --------------------------------------------------------------------------- rollout evaluation

    def rollout_model(self):
        return self.accelerator.unwrap_model(self.model)

    def generate_rollouts(self, prompts: Sequence[PromptEncoding]) -> list[Rollout]:
        """The rollout engine on the current policy (every rank calls this the same number of times);
        parameters sharded across ranks are gathered per ``sharded_generation`` (:mod:`src.rollout.sharded`)."""
        return generate_rollouts(self.rollout_engine, prompts, model=self.rollout_model(), wrapped=self.model_wrapped,
                                 sharded_generation=self.run_config.rollout_matching.sharded_generation)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.sharding is None:  # once, on the wrapped model (the Trainer wraps it inside train())
            self.sharding = sharding_summary(model)
            if self.is_world_process_zero():
                print(f"[sharding] {self.sharding.line()}", flush=True)
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy-style rollouts (the configured decoding) on the val set; reports
        ``{prefix}_rollout_precision/recall/f1`` (matched / predicted, matched / GT) and parse health."""
        from src.rollout_matching.parser import parse_rollout
        from src.rollout_matching.stats import DetectionCounts, count_matches, match_kwargs

        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("evaluate() needs an eval dataset (custom.val_jsonl)")
        rank, world_size = world()
        n = len(ds)
        shard = list(range(rank, n, world_size))
        per_rank = math.ceil(n / world_size)
        bs = self.rollout_engine.settings.decode_batch_size
        rm = self.run_config.rollout_matching
        counts = DetectionCounts()
        prompt = prompt_text(self.processor)
        t0 = time.perf_counter()
        # progress of this rank's shard, shown by the main process (every rank has the same number of calls)
        where = f" (rank 0's {len(shard)} of {n})" if world_size > 1 else ""
        with tqdm(total=len(shard), desc=f"{metric_key_prefix} rollouts{where}", unit="img", file=sys.stderr,
                  disable=self.args.disable_tqdm or not self.is_world_process_zero()) as bar:
            for start in range(0, per_rank, bs):
                idx = shard[start : start + bs]
                real = len(idx)
                if real == 0:  # keep the number of generate calls equal on every rank (ZeRO-3 / FSDP)
                    idx = [0]
                records = [ds[i]["record"] for i in idx]
                prompts = [encode_prompt(self.processor, load_image(r.image, r.source), prompt) for r in records]
                rollouts = self.generate_rollouts(prompts)
                for rec, ro in list(zip(records, rollouts))[:real]:
                    parsed = parse_rollout(ro.response_ids, self.table)
                    counts.add(count_matches(parsed, rec.objects, match_kwargs(rm), hit_cap=ro.hit_max_new_tokens))
                bar.update(real)
        totals = torch.tensor(counts.as_list(), dtype=torch.float64)
        if world_size > 1:
            totals = totals.to(self.args.device)
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        metrics = DetectionCounts.from_list(totals.cpu().tolist()).metrics(prefix=f"{metric_key_prefix}_")
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - t0, 3)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
