"""Degenerate-loop guard for rollouts (SPEC §11): decide, token by token, when to stop generating.

A rollout that falls into a loop (the same object again and again, or an n-gram cycle) burns compute
until ``max_new_tokens``. Stopping early is lossless for every COMPLETE object: the parser's prefix cut
keeps them and the missing GT objects are appended anyway. The guard stops a row when

* ``max_objects`` object entries have completed (when set),
* one identical object value (same bytes: desc and coords) has completed ``max_duplicate_objects``
  extra times,
* ``max_consecutive_duplicates`` objects in a row each repeat an earlier object (a loop over several
  objects, e.g. A B C A B; a single stray duplicate is tolerated), or
* the last ``ngram_size`` tokens have occurred ``ngram_max_repeats`` times in the response.

``RowGuard`` is incremental: O(piece bytes) per token, O(1) n-gram bookkeeping (rolling hash-free tuple
keys of fixed length). It reads token bytes from a :class:`TokenTable` and never imports transformers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from src.rollout_matching.tokens import TokenTable


@dataclass(frozen=True)
class GuardSettings:
    max_objects: int | None = None
    max_duplicate_objects: int = 2
    ngram_size: int = 64
    ngram_max_repeats: int = 4
    max_consecutive_duplicates: int = 2

    @classmethod
    def from_config(cls, g) -> "GuardSettings":
        """From a :class:`src.config.schema.RepeatGuardConfig`."""
        return cls(**{k: getattr(g, k) for k in cls.__dataclass_fields__})


class RowGuard:
    """Guard state of one generated sequence. Feed tokens with :meth:`push`; it returns True (and sets
    :attr:`reason`) once the row should stop."""

    def __init__(self, table: TokenTable, settings: GuardSettings):
        self.table, self.s = table, settings
        self.tokens: list[int] = []
        self.ngrams: dict[tuple[int, ...], int] = defaultdict(int)
        self.objects = 0
        self.seen_objects: dict[bytes, int] = defaultdict(int)
        self.duplicate_run = 0
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.obj_buf = bytearray()
        self.reason: str | None = None

    def push(self, token_id: int) -> bool:
        if self.reason is not None:
            return True
        self.tokens.append(token_id)
        n = self.s.ngram_size
        if len(self.tokens) >= n:
            key = tuple(self.tokens[-n:])
            self.ngrams[key] += 1
            if self.ngrams[key] >= self.s.ngram_max_repeats:
                self.reason = "ngram"
                return True
        for byte in self.table.piece(token_id):
            if self._byte(byte):
                return True
        return False

    def _byte(self, c: int) -> bool:
        if self.depth >= 2:
            self.obj_buf.append(c)
        if self.in_str:
            if self.esc:
                self.esc = False
            elif c == 0x5C:  # backslash
                self.esc = True
            elif c == 0x22:  # quote
                self.in_str = False
            return False
        if c == 0x22:
            self.in_str = True
        elif c in (0x7B, 0x5B):  # { [
            self.depth += 1
            if self.depth == 2 and c == 0x7B:
                self.obj_buf = bytearray(b"{")
        elif c in (0x7D, 0x5D):  # } ]
            self.depth -= 1
            if self.depth == 1 and c == 0x7D:
                return self._object_closed(bytes(self.obj_buf))
        return False

    def _object_closed(self, value: bytes) -> bool:
        self.objects += 1
        self.seen_objects[value] += 1
        if self.seen_objects[value] > self.s.max_duplicate_objects:
            self.reason = "duplicate_object"
            return True
        self.duplicate_run = self.duplicate_run + 1 if self.seen_objects[value] > 1 else 0
        if self.duplicate_run >= self.s.max_consecutive_duplicates:
            self.reason = "duplicate_run"
            return True
        if self.s.max_objects is not None and self.objects >= self.s.max_objects:
            self.reason = "max_objects"
            return True
        return False
