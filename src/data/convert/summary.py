"""The summary printed after a conversion (and by ``python -m src.data.convert check``).

Images, objects, per-category counts, objects/image percentiles, the converter's edge-case counts, and
the answer length in tokens with the real Qwen tokenizer (the canonical answer of each record, objects
in the default ``sorted`` order, plus the closing ``<|im_end|>``): p50 / p90 / max next to
``max_new_tokens``, with a warning when some answers will be cut.

The tokenizer (transformers / tokenizers, ~2-4 s to build) is loaded only when token counts are asked
for; everything else here is plain Python.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from src.data.contract import Record
from src.data.serialize import order_objects, serialize_objects

TOKEN_BATCH = 2048  # answers tokenized per call (the fast tokenizer batches in Rust)
CATEGORIES_SHOWN = 20


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (``q`` in 0..100) of integers; 0 for no values."""
    if not values:
        return 0
    s = sorted(values)
    k = max(0, min(len(s) - 1, -(-len(s) * q // 100) - 1))  # ceil(n*q/100) - 1
    return s[int(k)]


def answer_text(record: Record) -> str:
    """The canonical assistant text of a record (objects in the default ``sorted`` order)."""
    return serialize_objects(order_objects(record.objects, "sorted"))


@dataclass
class AnswerLengths:
    """Answer lengths in tokens (answer + ``<|im_end|>``), gathered batch by batch.
    ``count_tokens(texts) -> lengths`` defaults to the real Qwen tokenizer (built on first use)."""

    count_tokens: Callable[[list[str]], list[int]] | None = None
    lengths: list[int] = field(default_factory=list)
    _pending: list[str] = field(default_factory=list)

    def add(self, record: Record) -> None:
        self._pending.append(answer_text(record))
        if len(self._pending) >= TOKEN_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        if self.count_tokens is None:
            self.count_tokens = qwen_token_counter()
        self.lengths.extend(n + 1 for n in self.count_tokens(self._pending))  # + <|im_end|>
        self._pending = []


def qwen_token_counter() -> Callable[[list[str]], list[int]]:
    """Token counts with the project's offline Qwen tokenizer (coord tokens atomic)."""
    from src.models.tokenizer import build_qwen_tokenizer

    backend = build_qwen_tokenizer().backend_tokenizer

    def count(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]

    return count


@dataclass
class Summary:
    """What the summary reports; :meth:`format` prints it."""

    images: int
    objects: int
    per_category: Counter
    objects_per_image: list[int]
    edge_cases: dict[str, int] = field(default_factory=dict)
    answer_tokens: list[int] = field(default_factory=list)
    max_new_tokens: int | None = None

    @property
    def truncated(self) -> int:
        """Images whose answer is longer than ``max_new_tokens``."""
        if self.max_new_tokens is None:
            return 0
        return sum(n > self.max_new_tokens for n in self.answer_tokens)

    def format(self) -> str:
        n = self.objects_per_image
        lines = [
            f"images {self.images:,}   objects {self.objects:,} ({self.objects / max(self.images, 1):.2f}/image)"
            f"   images without objects {sum(1 for k in n if k == 0):,}",
            f"objects per image: p50 {percentile(n, 50)}  p90 {percentile(n, 90)}  p99 {percentile(n, 99)}  max {max(n, default=0)}",
        ]
        top = self.per_category.most_common(CATEGORIES_SHOWN)
        more = len(self.per_category) - len(top)
        lines.append(f"categories with objects {len(self.per_category):,}: " + ", ".join(f"{d} {c:,}" for d, c in top)
                     + (f", ... {more:,} more" if more > 0 else ""))
        if self.edge_cases:
            lines.append("edge cases: " + ", ".join(f"{k} {v:,}" for k, v in self.edge_cases.items()))
        if self.answer_tokens:
            t = self.answer_tokens
            lines.append(f"answer tokens (Qwen tokenizer, incl. <|im_end|>): p50 {percentile(t, 50):,}  p90 {percentile(t, 90):,}"
                         f"  max {max(t):,}   max_new_tokens {self.max_new_tokens:,}")
            if self.truncated:
                lines.append(
                    f"warning: {self.truncated:,} of {len(t):,} images ({100 * self.truncated / len(t):.1f}%) have answers longer than "
                    f"max_new_tokens={self.max_new_tokens:,} (longest {max(t):,}): their rollouts will be cut. Raise "
                    "custom.extra.rollout_matching.max_new_tokens or convert with --max-objects N."
                )
        return "\n".join(lines)


def summarize_records(records: Sequence[Record], max_new_tokens: int | None,
                      count_tokens: Callable[[list[str]], list[int]] | None = None) -> Summary:
    """A :class:`Summary` of already-loaded records (``check``); ``max_new_tokens`` None skips tokens."""
    lengths = AnswerLengths(count_tokens)
    if max_new_tokens is not None:
        for r in records:
            lengths.add(r)
        lengths.flush()
    return Summary(
        images=len(records), objects=sum(len(r.objects) for r in records),
        per_category=Counter(o.desc for r in records for o in r.objects),
        objects_per_image=[len(r.objects) for r in records], answer_tokens=lengths.lengths, max_new_tokens=max_new_tokens,
    )
