"""Stage 2 (``custom.trainer_variant: rollout_matching_sft``): train on the model's own rollouts.

Per micro-batch, in ONE ``compute_loss`` (SPEC §1, §10-§13):

    rollout (no grad, batched generate) -> parse (strict, token-aligned) -> match (maskIoU, gating,
    dummies) -> targets (OT for the prefix, SerializeAppend for FN) ->
    ONE teacher-forced forward on prompt + Y_train -> masked CE + coord losses

Everything between the rollout and the forward is pure code in :mod:`src.rollout_matching`; this file
is the glue, in pipeline order.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from src.config.loader import ConfigError
from src.data.contract import DataError, Record
from src.data.images import load_image
from src.rollout.encoding import encode_prompt, image_digests
from src.rollout_matching.matcher import match_objects
from src.rollout_matching.parser import ParseResult, parse_rollout
from src.rollout_matching.stats import match_kwargs
from src.rollout_matching.targets import ControlTokenError, TrainTarget, build_train_target
from src.trainers.base import DetectionTrainer
from src.trainers.batches import SupervisedSequence, right_padded_teacher_forced
from src.trainers.metrics import ratio
from src.utils.parallel import world
from src.rollout.engine import Rollout

# Summed over the micro-batches of a logging window and over ranks (SPEC §13 names first).
ROLLOUT_SUM_KEYS = (
    "rollout/parse_dropped_invalid", "rollout/parse_truncated", "rollout/valid_pred_objects",
    "rollout/matched_for_supervision", "rollout/excluded_from_supervision", "rollout/fn_appended",
    "rollout/gating_rejections", "rollout/gt_objects",
    "rollout/samples", "rollout/parse_malformed", "rollout/parse_fallback", "rollout/cut_backoffs",
    "rollout/new_tokens", "rollout/hit_max_new_tokens", "rollout/repeat_guard_stops",
    "time/rollout_s", "time/targets_s", "time/forward_backward_s", "time/weight_push_s", "weight_pushes",
)


class PromptMismatchError(RuntimeError):
    """The teacher-forced prompt differs from the rollout's prompt (a bug; never train on it)."""


class SupervisionSpanError(RuntimeError):
    """A supervised position fell outside the assistant span (a bug; never train on it)."""


class RolloutCollator:
    """Keeps the raw records (the trainer rolls out itself) and encodes each prompt once (in the
    dataloader), so the rollout and the teacher-forced forward use the very same prompt tensors."""

    def __init__(self, processor):
        from src.data.prompt import prompt_text

        self.processor = processor
        self.prompt = prompt_text(processor)

    def __call__(self, items: list[dict]) -> dict:
        records = [it["record"] for it in items]
        prompts = [encode_prompt(self.processor, load_image(r.image, r.source), self.prompt) for r in records]
        return {"records": records, "prompts": prompts}


def check_prompt_alignment(batch: dict[str, torch.Tensor], rollouts: Sequence[Rollout]) -> None:
    """The teacher-forced forward must see exactly what generation consumed: the same prompt ids (as the
    engine reports them, padding removed) and the same image pixels (sha1 of each image's rows). Raise
    :class:`PromptMismatchError` naming the sample otherwise."""
    start = batch["assistant_start"]
    digests = image_digests(batch["pixel_values"], batch["image_grid_thw"])
    for b, ro in enumerate(rollouts):
        n = int(start[b])
        consumed = ro.consumed_prompt_ids
        if n != len(consumed):
            raise PromptMismatchError(f"sample {b}: the teacher-forced prompt has {n} tokens, generation consumed {len(consumed)}")
        ids = batch["input_ids"][b, :n].tolist()
        if ids != list(consumed):
            k = next(i for i, (x, y) in enumerate(zip(ids, consumed)) if x != y)
            raise PromptMismatchError(f"sample {b}: teacher-forced prompt ids differ from the ids generation consumed "
                                      f"(first at position {k}: {ids[k]} != {consumed[k]})")
        if digests[b] != ro.consumed_image_digest:
            raise PromptMismatchError(f"sample {b}: the teacher-forced image pixels differ from the ones generation consumed "
                                      f"(sha1 {digests[b][:12]} != {ro.consumed_image_digest[:12]})")


@dataclass
class MicroBatchPlan:
    """What the pipeline made of one micro-batch before its forward: the rollouts, per sample (parse,
    match, target), the teacher-forced batch (CPU tensors) and the seconds spent (the rollout time of a
    window is shared out by sample count)."""

    rollouts: list[Rollout]
    built: list[tuple[ParseResult, Any, TrainTarget]]
    batch: dict[str, torch.Tensor]
    rollout_s: float = 0.0
    targets_s: float = 0.0


@dataclass
class RolloutWindow:
    """The micro-batches of one optimizer step (``rollout_window: optimizer_step``): rolled out together
    the first time one of them trains; ``token_count`` = the step's supervised positions over all ranks
    (``loss_normalization: token``)."""

    batches: list[dict]
    plans: list[MicroBatchPlan] | None = None
    token_count: float | None = None


def check_supervision_span(batch: dict[str, torch.Tensor], y_lengths: Sequence[int]) -> None:
    """Every supervised logit position t (predicting token t+1) lies in [start-1, start-1+len(Y_train))."""
    mask = batch["supervised_mask"]
    for b, n in enumerate(y_lengths):
        lo = int(batch["assistant_start"][b]) - 1
        pos = mask[b].nonzero(as_tuple=True)[0]
        if pos.numel() and (int(pos.min()) < lo or int(pos.max()) >= lo + n):
            raise SupervisionSpanError(f"sample {b}: supervised positions {int(pos.min())}..{int(pos.max())} outside the assistant span [{lo}, {lo + n})")


def rollout_sample(rec: Record, ro: Rollout, parsed: ParseResult, match, tgt: TrainTarget, table) -> dict[str, Any]:
    """One ``rollouts.jsonl`` line (without ``step`` / ``decode_mode``), self-contained for
    ``python -m src.replay``: its ``id``, ``response_token_ids`` and GT ``objects`` (bins, file order) are
    the replay input; ``matches`` / ``fp`` / ``fn_appended`` / ``y_train`` are what training did with them."""
    return {
        "id": rec.id if rec.id is not None else rec.source, "image": str(rec.image), "source": rec.source,
        "response_token_ids": list(ro.response_ids),
        "objects": [{"desc": o.desc, o.geometry: list(o.bins)} for o in rec.objects],
        "raw_rollout": table.text(ro.response_ids),
        "hit_max_new_tokens": ro.hit_max_new_tokens, "stopped_by_guard": ro.stopped_by_guard,
        "truncated": parsed.truncated, "malformed": parsed.malformed, "dropped_invalid": parsed.dropped_invalid,
        "valid_objects": [{"key": o.key, "desc": o.desc, "geometry": o.geometry, "bins": list(o.bins)} for o in parsed.objects],
        "matches": [list(p) for p in match.matches], "fp": list(match.fp),
        "fn_appended": tgt.fn_appended, "y_train": table.text(tgt.y_ids),
    }


def trim_rollout_log(path: Path, last_step: int) -> int:
    """Keep the lines of ``rollouts.jsonl`` logged at optimizer steps <= ``last_step`` (rewritten via a temp
    file + rename). Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return len(lines) - len(kept)


class RolloutMatchingSFTTrainer(DetectionTrainer):
    extra_metric_keys = ROLLOUT_SUM_KEYS

    @staticmethod
    def make_collator(processor, cfg, seed: int):
        return RolloutCollator(processor)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.run_config.training.packing:
            raise ConfigError("training.packing: true is not supported with custom.trainer_variant: rollout_matching_sft; set training.packing: false")
        self._rng = random.Random(self.args.seed)
        self._samples_for_log: list[dict] = []
        self._pipeline_s = 0.0

    # ------------------------------------------------------------------ checkpoint / resume state

    def _rollout_rng_file(self, checkpoint_dir: str | Path) -> Path:
        rank, world_size = world()
        return Path(checkpoint_dir) / ("trainer_rollout_rng.json" if world_size == 1 else f"trainer_rollout_rng_{rank}.json")

    def save_extra_state(self, checkpoint_dir: Path) -> None:
        """This trainer's own ``random.Random`` (FN order under ``custom.object_ordering: random``), next
        to the Trainer's torch/numpy/python RNG states."""
        version, state, gauss = self._rng.getstate()
        self._rollout_rng_file(checkpoint_dir).write_text(json.dumps({"version": version, "state": list(state), "gauss": gauss}))

    def _load_rng_state(self, checkpoint) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        f = self._rollout_rng_file(checkpoint)
        if f.exists():
            d = json.loads(f.read_text())
            self._rng.setstate((d["version"], tuple(d["state"]), d["gauss"]))

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        """A resumed run continues ``rollouts.jsonl`` after dropping the lines logged past the checkpoint
        (they are logged again); a fresh run starts the file anew (the launcher never lets a fresh run
        into a directory holding another run's file)."""
        if isinstance(resume_from_checkpoint, (str, Path)) and self.is_world_process_zero():
            step = json.loads((Path(resume_from_checkpoint) / "trainer_state.json").read_text())["global_step"]
            trim_rollout_log(self.rollout_log_path(), step)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def rollout_log_path(self) -> Path:
        return Path(self.args.output_dir) / "rollouts.jsonl"

    # ----------------------------------------------------------------------------- the pipeline

    def build_targets(self, records: Sequence[Record], rollouts: Sequence[Rollout]) -> list[tuple[ParseResult, Any, TrainTarget]]:
        """Parse -> match -> targets for each sample (pure code, no model)."""
        rm = self.run_config.rollout_matching
        mk = match_kwargs(rm)
        out = []
        for rec, ro in zip(records, rollouts):
            parsed = parse_rollout(ro.response_ids, self.table)
            match = match_objects([o.to_det_object() for o in parsed.objects], rec.objects, **mk)
            try:
                target = build_train_target(
                    parsed, rec.objects, match, self.table, ot_cost=rm.ot_cost, ot_epsilon=rm.ot_epsilon, ot_iters=rm.ot_iters,
                    supervise_eos=rm.supervise_eos, fn_ordering=self.run_config.custom.object_ordering, rng=self._rng,
                )
            except ControlTokenError as e:
                raise DataError(f"{rec.source}: {e}") from None
            out.append((parsed, match, target))
        return out

    def plan(self, records: Sequence[Record], rollouts: Sequence[Rollout]) -> MicroBatchPlan:
        """Parse -> match -> targets -> the teacher-forced batch (CPU) for one micro-batch, checked: the
        forward's prompt is what generation consumed, every supervised position lies in Y_train."""
        built = self.build_targets(records, rollouts)
        seqs = []
        for ro, (_, _, tgt) in zip(rollouts, built):
            ce, bins, seg = tgt.supervision_arrays()
            seqs.append(SupervisedSequence(prompt=ro.prompt, assistant_ids=list(tgt.y_ids), ce_targets=ce, coord_bins=bins, coord_segment=seg))
        batch = right_padded_teacher_forced(seqs, self.processor.tokenizer.pad_token_id)
        check_prompt_alignment(batch, rollouts)
        check_supervision_span(batch, [len(t.y_ids) for _, _, t in built])
        return MicroBatchPlan(list(rollouts), built, batch)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The Trainer fetches the micro-batches of one optimizer step here, before any of them trains.
        With ``rollout_window: optimizer_step`` they share one :class:`RolloutWindow`, rolled out when the
        first of them trains (after the Trainer has restored RNG states on resume)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.run_config.rollout_matching.rollout_window == "optimizer_step" and batches:
            window = RolloutWindow(batches)
            for i, b in enumerate(batches):
                b["window"], b["window_index"] = window, i
        return batches, num_items

    def plan_window(self, window: RolloutWindow) -> None:
        """ONE engine call for every prompt of the optimizer step (the weights cannot change before its
        last backward, so each micro-batch gets exactly the rollouts it would get alone), then each
        micro-batch's plan; with ``loss_normalization: token`` the step's supervised positions are
        counted over all micro-batches and ranks."""
        t0 = time.perf_counter()
        prompts = [p for b in window.batches for p in b["prompts"]]
        rollouts = self.generate_rollouts(prompts)
        rollout_s = time.perf_counter() - t0
        self._record_engine_stats()
        plans, start = [], 0
        for b in window.batches:
            n = len(b["records"])
            t1 = time.perf_counter()
            plan = self.plan(b["records"], rollouts[start : start + n])
            plan.rollout_s, plan.targets_s = rollout_s * n / len(prompts), time.perf_counter() - t1
            plans.append(plan)
            start += n
        window.plans = plans
        if self.run_config.rollout_matching.loss_normalization == "token":
            count = torch.tensor([float(sum(int(p.batch["supervised_mask"].sum()) for p in plans))], dtype=torch.float64)
            if world()[1] > 1:  # every rank plans the same number of windows: the same collectives in the same order
                count = count.to(self.args.device)
                dist.all_reduce(count, op=dist.ReduceOp.SUM)
            window.token_count = float(count.item())

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        records: list[Record] = inputs["records"]
        window: RolloutWindow | None = inputs.get("window")
        if window is not None:
            if window.plans is None:
                t0 = time.perf_counter()
                self.plan_window(window)
                self._pipeline_s = time.perf_counter() - t0
            plan = window.plans[inputs["window_index"]]
        else:  # rollout_window: micro_batch (or a caller outside the training loop)
            t0 = time.perf_counter()
            rollouts = self.generate_rollouts(inputs["prompts"])
            t1 = time.perf_counter()
            if model.training:
                self._record_engine_stats()
            plan = self.plan(records, rollouts)
            plan.rollout_s, plan.targets_s = t1 - t0, time.perf_counter() - t1
            self._pipeline_s = time.perf_counter() - t0

        batch = self._prepare_inputs(plan.batch)
        batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
        denominator = None
        if self.run_config.rollout_matching.loss_normalization == "token" and model.training:
            if window is None or window.token_count is None:
                raise RuntimeError("loss_normalization: token needs the optimizer step's token count (rollout_window: optimizer_step)")
            # the Trainer divides by the accumulation steps and DDP averages over ranks: undo both here
            denominator = max(window.token_count, 1.0) / (self.current_gradient_accumulation_steps * world()[1])
        out = self.supervised_forward(model, batch, sources=[r.source for r in records], token_denominator=denominator)  # the ONE teacher-forced forward

        if model.training:
            self.record_losses(out, len(records))
            self._record_rollout_counters(records, plan.rollouts, plan.built, rollout_s=plan.rollout_s, targets_s=plan.targets_s)
            self._keep_samples(records, plan.rollouts, plan.built)
        return (out.loss, None) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        t0 = time.perf_counter()
        self._pipeline_s = 0.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        # forward + backward (+ input moves) = the whole micro-step minus rollout and target building
        self.step_metrics.add("time/forward_backward_s", max(time.perf_counter() - t0 - self._pipeline_s, 0.0))
        return loss

    # ---------------------------------------------------------------------------------- counters

    def _record_rollout_counters(self, records, rollouts, built, rollout_s: float, targets_s: float) -> None:
        m = self.step_metrics
        for rec, ro, (parsed, match, tgt) in zip(records, rollouts, built):
            m.add_many({
                "rollout/parse_dropped_invalid": parsed.dropped_invalid,
                "rollout/parse_truncated": float(parsed.truncated),
                "rollout/parse_malformed": float(parsed.malformed),
                "rollout/parse_fallback": float(parsed.fallback),
                "rollout/cut_backoffs": parsed.cut_backoffs,
                "rollout/valid_pred_objects": len(parsed.objects),
                "rollout/matched_for_supervision": tgt.matched_for_supervision,
                "rollout/excluded_from_supervision": tgt.excluded_from_supervision,
                "rollout/fn_appended": tgt.fn_appended,
                "rollout/gating_rejections": match.gating_rejections,
                "rollout/gt_objects": len(rec.objects),
                "rollout/samples": 1,
                "rollout/new_tokens": len(ro.response_ids),
                "rollout/hit_max_new_tokens": float(ro.hit_max_new_tokens),
                "rollout/repeat_guard_stops": float(ro.stopped_by_guard),
            })
        m.add("time/rollout_s", rollout_s)
        m.add("time/targets_s", targets_s)

    def _record_engine_stats(self) -> None:
        """The weight push an engine did before its last rollout (vLLM; the HF engine pushes nothing)."""
        stats = self.rollout_engine.last_stats
        self.step_metrics.add("time/weight_push_s", stats.get("weight_push_s", 0.0))
        self.step_metrics.add("weight_pushes", stats.get("weight_pushes", 0.0))

    def derive_metrics(self, s: dict[str, float]) -> dict[str, float]:
        out = super().derive_metrics(s)
        n = s["rollout/samples"]
        out.update({k: s[k] for k in ROLLOUT_SUM_KEYS[:8]})
        out.update({
            "rollout/match_rate": ratio(s["rollout/matched_for_supervision"], s["rollout/gt_objects"]),
            "rollout/samples": n,
            "rollout/parse_malformed": s["rollout/parse_malformed"],
            "rollout/parse_fallback": s["rollout/parse_fallback"],
            "rollout/cut_backoffs": s["rollout/cut_backoffs"],
            "rollout/new_tokens_mean": ratio(s["rollout/new_tokens"], n),
            "rollout/hit_max_new_tokens": s["rollout/hit_max_new_tokens"],
            "rollout/repeat_guard_stops": s["rollout/repeat_guard_stops"],
            "time/rollout_ms_per_sample": 1000 * ratio(s["time/rollout_s"], n),
            "time/targets_ms_per_sample": 1000 * ratio(s["time/targets_s"], n),
            "time/forward_backward_ms_per_sample": 1000 * ratio(s["time/forward_backward_s"], n),
            "time/weight_push_s": ratio(s["time/weight_push_s"], s["weight_pushes"]),
        })
        return out

    # --------------------------------------------------------------------------- rollout samples

    def _keep_samples(self, records, rollouts, built) -> None:
        k = self.run_config.rollout_matching.log_rollout_samples
        if k <= 0 or len(self._samples_for_log) >= k:
            return
        for rec, ro, (parsed, match, tgt) in zip(records, rollouts, built):
            if len(self._samples_for_log) >= k:
                break
            self._samples_for_log.append(rollout_sample(rec, ro, parsed, match, tgt, self.table))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        is_train_log = "loss" in logs and not any(k.startswith("eval_") for k in logs)
        super().log(logs, start_time)
        if is_train_log and self._samples_for_log:
            if self.is_world_process_zero():
                path = self.rollout_log_path()
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as f:
                    for s in self._samples_for_log:
                        f.write(json.dumps({"step": self.state.global_step, "decode_mode": self.run_config.rollout_matching.decode_mode, **s}, ensure_ascii=False) + "\n")
            self._samples_for_log = []
