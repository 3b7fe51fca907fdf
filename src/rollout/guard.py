"""The repeat guard as a transformers stopping criterion (the guard's logic: :mod:`src.rollout_matching.repeat_guard`)."""

from __future__ import annotations

import torch


class RepeatGuardCriteria:
    """``transformers`` stopping criterion running one :class:`RowGuard` per generated row.

    Rows that already emitted an end token are no longer fed. ``stopped_rows`` holds the rows the guard
    stopped (counted as ``rollout/repeat_guard_stops``)."""

    def __init__(self, table, settings, prompt_len: int, end_ids: tuple[int, ...]):
        from src.rollout_matching.repeat_guard import RowGuard

        self._row = lambda: RowGuard(table, settings)
        self.rows: list = []
        self.seen = prompt_len
        self.end_ids = end_ids
        self.done: set[int] = set()
        self.stopped_rows: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        if not self.rows:
            self.rows = [self._row() for _ in range(input_ids.shape[0])]
        new = input_ids[:, self.seen :].tolist()
        self.seen = input_ids.shape[1]
        out = []
        for b, toks in enumerate(new):
            for t in toks:
                if b in self.done:
                    break
                if t in self.end_ids:
                    self.done.add(b)
                elif self.rows[b].push(t):
                    self.done.add(b)
                    self.stopped_rows.add(b)
            out.append(b in self.stopped_rows)
        return torch.tensor(out, dtype=torch.bool, device=input_ids.device)
