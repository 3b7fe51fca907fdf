"""The in-memory object type shared by every stage: a description and one geometry in bins."""

from __future__ import annotations

import re
from dataclasses import dataclass
from operator import itemgetter
from typing import Literal, Sequence

Geometry = Literal["bbox_2d", "poly"]
GEOMETRIES: tuple[str, ...] = ("bbox_2d", "poly")

# Text that Qwen tokenizers turn into a control token wherever it appears in encoded text: the special
# and added tokens (`<|im_end|>`, `<|coord_5|>`, `<|vision_start|>`, ...) and the added tags below.
CONTROL_TEXT = re.compile(r"<\|[A-Za-z0-9_]+\|>|</?(?:think|tool_call|tool_response)>")


def control_text_in(desc: str) -> str | None:
    """The first piece of ``desc`` that spells a tokenizer control token (None if there is none). Such a
    desc would be encoded as that token: a coord loss inside a desc of the FN tail, a stop token in the
    middle of a stage-1 answer. It is not a valid desc anywhere (data contract, parser, src.eval)."""
    m = CONTROL_TEXT.search(desc)
    return m.group(0) if m else None


# bbox (x1, y1, x2, y2) -> flat corners (x1,y1),(x2,y1),(x2,y2),(x1,y2), the order of DetObject.points()
_BOX_CORNERS = itemgetter(0, 1, 2, 1, 2, 3, 0, 3)


@dataclass(frozen=True)
class DetObject:
    """One object. ``bins`` is the flat ``[x1, y1, x2, y2]`` (bbox) or ``[x1, y1, ..., xn, yn]`` (poly)
    in coord bins 0..999 (SPEC §3 convention)."""

    desc: str
    geometry: Geometry
    bins: tuple[int, ...]

    def points(self) -> list[tuple[int, int]]:
        """Vertices in bins: the poly's points, or a box's 4 corners (x1,y1),(x2,y1),(x2,y2),(x1,y2)."""
        b = self.bins
        if self.geometry == "bbox_2d":
            x1, y1, x2, y2 = b
            return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
        return [(b[i], b[i + 1]) for i in range(0, len(b), 2)]

    def aabb(self) -> tuple[int, int, int, int]:
        """Axis-aligned bounding box ``(x1, y1, x2, y2)`` in bins."""
        xs, ys = self.bins[0::2], self.bins[1::2]
        return min(xs), min(ys), max(xs), max(ys)


def flat_vertices(objs: Sequence[DetObject]) -> tuple[list[int], list[int]]:
    """Every object's vertices (as :meth:`DetObject.points`), flattened: ``[x, y, x, y, ...]`` over all
    objects, and each object's vertex count. One pass, no per-object lists (hot in matching and OT)."""
    flat: list[int] = []
    sizes: list[int] = []
    for o in objs:
        corners = _BOX_CORNERS(o.bins) if o.geometry == "bbox_2d" else o.bins
        flat.extend(corners)
        sizes.append(len(corners) // 2)
    return flat, sizes
