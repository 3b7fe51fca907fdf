"""Per-step metric accumulation with one cross-rank reduction per log.

Values are accumulated as sums over the micro-batches of the logging window; ``reduce`` packs them in a
FIXED key order into one tensor and all-reduces it (SUM) — every rank issues the same collective in the
same order, whatever its samples were (an empty rank contributes zeros).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.distributed as dist


class StepMetrics:
    def __init__(self, keys: Iterable[str]):
        self.keys = tuple(keys)
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._values = torch.zeros(len(self.keys), dtype=torch.float64)

    def add(self, name: str, value: float | torch.Tensor) -> None:
        if name not in self._index:
            raise KeyError(f"metric {name!r} is not declared (declared: {self.keys})")
        self._values[self._index[name]] += float(value)

    def add_many(self, values: Mapping[str, float | torch.Tensor]) -> None:
        for k, v in values.items():
            self.add(k, v)

    def reduce(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """Sum over ranks (collective when distributed) and reset. Returns the summed values."""
        t = self._values.to(device=device, dtype=torch.float64, copy=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self._values.zero_()
        return dict(zip(self.keys, t.cpu().tolist()))


def ratio(num: float, den: float) -> float:
    """num / den, 0 when den is 0 (a window with no such positions)."""
    return num / den if den else 0.0
