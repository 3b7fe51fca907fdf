"""Shared pieces of the benchmark cases: the figure record and table, machine facts, the lazily built
assets (tokenizer, token table, tiny model dirs, shapes data) and synthetic dense rollouts."""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DESCS = ["person", "car", "traffic light", "dog", "chair", "cup", "bottle", "potted plant", "book", "umbrella"]


# ----------------------------------------------------------------------------------- reporting


@dataclass
class Figure:
    case: str
    name: str
    value: float | str
    unit: str = ""
    goal: str = ""
    passed: bool | None = None  # None: informational

    def row(self) -> list[str]:
        v = self.value
        if isinstance(v, float):
            v = f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        status = "" if self.passed is None else ("PASS" if self.passed else "FAIL")
        return [self.case, self.name, f"{v} {self.unit}".strip(), self.goal, status]


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem_gb = round(int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gb": mem_gb,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def print_table(figs: list[Figure], machine: dict[str, Any], mode: str) -> None:
    print(f"\nsrc.bench ({mode}) - {machine['date']}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; python {machine['python']}, "
          f"torch {machine['torch']}, transformers {machine['transformers']}")
    rows = [["case", "figure", "value", "goal", ""]] + [f.row() for f in figs]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    n_fail = sum(f.passed is False for f in figs)
    print(f"\n{sum(f.passed is True for f in figs)} PASS, {n_fail} FAIL")



def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------- shared assets


class Assets:
    """Built lazily once per run: the offline Qwen tokenizer, its token table, a tiny model dir, shapes data."""

    def __init__(self, root: Path):
        self.root = root
        self._tok = self._table = self._model_dir = self._shapes = None

    @property
    def tokenizer(self):
        if self._tok is None:
            from src.models.tokenizer import build_qwen_tokenizer

            self._tok = build_qwen_tokenizer()
        return self._tok

    @property
    def table(self):
        if self._table is None:
            from src.rollout_matching.tokens import token_table

            self._table = token_table(self.tokenizer)
        return self._table

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            from src.models.build_tiny import build_tiny_model_dir

            self._model_dir = build_tiny_model_dir(self.root / "tiny_qwen3_vl", "qwen3_vl", seed=0, preset="test", tokenizer=self.tokenizer)
        return self._model_dir

    def demo_model_dir(self, arch: str = "qwen3_vl") -> Path:
        """A tiny ``demo``-preset model (head_dim 32: vLLM's CPU attention refuses the ``test`` preset's 16)."""
        from src.models.build_tiny import build_tiny_model_dir

        d = self.root / f"tiny_{arch}_demo"
        return d if (d / "config.json").exists() else build_tiny_model_dir(d, arch, seed=0, preset="demo", tokenizer=self.tokenizer)

    @property
    def shapes(self) -> Path:
        if self._shapes is None:
            from src.data.make_shapes import make_shapes

            self._shapes = self.root / "shapes"
            make_shapes(self._shapes, num_train=16, num_val=2, seed=0, image_size=128, min_shapes=1, max_shapes=4)
        return self._shapes


# ------------------------------------------------------------------------------- synthetic data


def _rand_size(rng: random.Random) -> int:  # log-uniform 8..300 bins (LVIS-like: many small objects)
    return int(math.exp(rng.uniform(math.log(8), math.log(300))))


def make_gt(rng: random.Random, poly_frac: float = 0.4):
    from src.data.objects import DetObject

    w, h = _rand_size(rng), _rand_size(rng)
    x, y = rng.randint(0, 999 - w), rng.randint(0, 999 - h)
    if rng.random() >= poly_frac:
        return DetObject(rng.choice(DESCS), "bbox_2d", (x, y, x + w, y + h))
    n = rng.randint(5, 16)
    cx, cy = x + w / 2, y + h / 2
    pts: list[int] = []
    for k in range(n):
        a = 2 * math.pi * k / n + rng.uniform(-0.2, 0.2)
        r = rng.uniform(0.6, 1.0)
        pts += [min(999, max(0, round(cx + r * w / 2 * math.cos(a)))), min(999, max(0, round(cy + r * h / 2 * math.sin(a))))]
    return DetObject(rng.choice(DESCS), "poly", tuple(pts))


def jitter(o, rng: random.Random):
    from src.data.coords import fix_box_bins
    from src.data.objects import DetObject

    x1, y1, x2, y2 = o.aabb()
    s = max(2, int(0.04 * max(x2 - x1, y2 - y1)))
    b = tuple(min(999, max(0, v + rng.randint(-s, s))) for v in o.bins)
    if o.geometry == "bbox_2d":
        b = fix_box_bins(b)
    return DetObject(o.desc, o.geometry, b)


def dense_sample(n: int, rng: random.Random, table, poly_frac: float = 0.4) -> tuple[list[int], list]:
    """``n`` GT objects and a rollout of ~1.3 n predictions: 90% of GT found (jittered), 15% of those
    twice (near-duplicates), hallucinations up to 1.3 n; shuffled, serialised, ended with <|im_end|>."""
    from src.data.serialize import serialize_objects

    gts = [make_gt(rng, poly_frac) for _ in range(n)]
    preds = []
    for g in gts:
        if rng.random() < 0.9:
            preds.append(jitter(g, rng))
            if rng.random() < 0.15:
                preds.append(jitter(g, rng))
    while len(preds) < round(1.3 * n):
        preds.append(make_gt(rng, poly_frac))
    rng.shuffle(preds)
    return table.encode(serialize_objects(preds)) + [table.im_end_id], gts


def step_timer():
    """A ``TrainerCallback`` whose ``steps`` lists the seconds of each optimizer step (``on_step_begin`` ..
    ``on_step_end``)."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.steps = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self.t0)

    return StepTimer()


def timed_stage2_trainer(model: dict, train_jsonl: Path, output_dir: Path, *, steps: int, batch: int, rollout: dict,
                         training: dict | None = None):
    """``(trainer, timer)``: a stage-2 trainer built by the launcher's own ``build_trainer`` for a step-time
    benchmark (``model.*`` keys ``model``; ``rollout``: extra ``rollout_matching`` keys; ``training``:
    extra ``training`` keys), without the per-step log prints, with a :func:`step_timer` attached."""
    from transformers.trainer_callback import PrinterCallback

    from src.config.loader import config_from_dict
    from src.sft import build_trainer

    config = config_from_dict({
        "model": model,
        "custom": {"trainer_variant": "rollout_matching_sft", "train_jsonl": str(train_jsonl),
                   "extra": {"rollout_matching": {"decode_batch_size": batch, "log_rollout_samples": 0, **rollout}}},
        "training": {"output_dir": str(output_dir), "per_device_train_batch_size": batch, "max_steps": steps,
                     "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": 0,
                     "disable_tqdm": True, **(training or {})},
    })
    trainer = build_trainer(config)
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts would bury the table
    timer = step_timer()
    trainer.add_callback(timer)
    return trainer, timer
