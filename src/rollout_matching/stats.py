"""Detection counts of parsed rollouts against GT — the ONE implementation of the matching statistics
shared by training-time rollout evaluation and ``src.eval``.

Two kinds of "matched", named so they cannot be confused:

* class-agnostic (``precision`` / ``recall`` / ``f1``): :func:`src.rollout_matching.matcher.match_objects`
  on geometry only (maskIoU >= gate), as training's matcher decides supervision;
* label-aware (``label_precision`` / ``label_recall`` / ``label_f1``): the same matcher run separately
  within each ``desc`` (exact string), so a prediction can only match a GT with the identical desc.

precision = matched / valid predicted objects, recall = matched / GT objects, F1 their harmonic mean.

Parse health, one meaning per word (the parser's :class:`ParseResult` fields):
``truncated`` = the answer ran out (end of the tokens or ``<|im_end|>``) before its top-level ``}``, its
structure intact so far; ``malformed`` = the structure broke (the scan stopped at a byte JSON does not
allow there); never both. ``hit_max_new_tokens`` = generation stopped at the token cap.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Any, Sequence

from src.data.objects import DetObject
from src.rollout_matching.matcher import match_objects
from src.rollout_matching.parser import ParseResult

MATCH_KEYS = ("candidate_top_k", "maskiou_gate", "maskiou_resolution", "maskiou_backend", "fp_cost", "fn_cost")


def match_kwargs(rm: Any, **overrides: Any) -> dict[str, Any]:
    """Matcher keyword arguments from a RolloutMatchingConfig (with optional overrides)."""
    return {**{k: getattr(rm, k) for k in MATCH_KEYS}, **overrides}


@dataclass
class DetectionCounts:
    images: float = 0
    pred_objects: float = 0
    gt_objects: float = 0
    matched: float = 0              # class-agnostic matches
    matched_label: float = 0        # label-aware matches (within each desc)
    parse_valid: float = 0          # the top-level object closed and every entry in it is a valid object
    images_with_valid_object: float = 0
    truncated: float = 0
    malformed: float = 0
    dropped_invalid: float = 0
    hit_max_new_tokens: float = 0

    def add(self, other: "DetectionCounts") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_list(self) -> list[float]:
        return [float(x) for x in astuple(self)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> "DetectionCounts":
        return cls(*values)

    def precision_recall_f1(self, matched: float) -> tuple[float, float, float]:
        p = matched / self.pred_objects if self.pred_objects else 0.0
        r = matched / self.gt_objects if self.gt_objects else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        p, r, f1 = self.precision_recall_f1(self.matched)
        lp, lr, lf1 = self.precision_recall_f1(self.matched_label)
        n = self.images or 1.0
        return {
            f"{prefix}rollout_precision": p,
            f"{prefix}rollout_recall": r,
            f"{prefix}rollout_f1": f1,
            f"{prefix}rollout_label_precision": lp,
            f"{prefix}rollout_label_recall": lr,
            f"{prefix}rollout_label_f1": lf1,
            f"{prefix}rollout_parse_valid_rate": self.parse_valid / n,
            f"{prefix}rollout_nonempty_rate": self.images_with_valid_object / n,
            f"{prefix}rollout_truncated_rate": self.truncated / n,
            f"{prefix}rollout_malformed_rate": self.malformed / n,
            f"{prefix}rollout_hit_max_new_tokens_rate": self.hit_max_new_tokens / n,
            f"{prefix}rollout_valid_objects_per_image": self.pred_objects / n,
            f"{prefix}rollout_dropped_invalid": self.dropped_invalid,
            f"{prefix}rollout_images": self.images,
        }


def label_aware_matches(preds: Sequence[DetObject], gts: Sequence[DetObject], match_kw: dict[str, Any]) -> int:
    """Matches of the matcher run separately within each desc (a prediction only meets GT of its own desc)."""
    total = 0
    for desc in {o.desc for o in preds} & {o.desc for o in gts}:
        total += len(match_objects([o for o in preds if o.desc == desc], [o for o in gts if o.desc == desc], **match_kw).matches)
    return total


def count_objects(
    preds: Sequence[DetObject], gts: Sequence[DetObject], match_kw: dict[str, Any], *,
    truncated: bool = False, malformed: bool = False, dropped_invalid: int = 0, hit_cap: bool = False,
) -> DetectionCounts:
    """Counts for one image from its valid predicted objects and its GT, both in bins.

    ``match_kw``: :func:`match_objects` keyword arguments (:func:`match_kwargs`). The parse-health
    fields describe how ``preds`` were obtained (defaults: a clean parse); the answer is parse-valid when
    it is neither truncated nor malformed and nothing was dropped."""
    m = match_objects(preds, gts, **match_kw)
    return DetectionCounts(
        images=1, pred_objects=len(preds), gt_objects=len(gts), matched=len(m.matches),
        matched_label=label_aware_matches(preds, gts, match_kw),
        parse_valid=float(not truncated and not malformed and dropped_invalid == 0), images_with_valid_object=float(len(preds) > 0),
        truncated=float(truncated), malformed=float(malformed), dropped_invalid=dropped_invalid, hit_max_new_tokens=float(hit_cap),
    )


def count_matches(parsed: ParseResult, gts: Sequence[DetObject], match_kw: dict[str, Any], hit_cap: bool = False) -> DetectionCounts:
    """Counts for one image from its parsed rollout (:func:`count_objects` on the valid objects)."""
    return count_objects(
        [o.to_det_object() for o in parsed.objects], gts, match_kw,
        truncated=parsed.truncated, malformed=parsed.malformed, dropped_invalid=parsed.dropped_invalid, hit_cap=hit_cap,
    )
