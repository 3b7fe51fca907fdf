"""Canonical assistant text (SPEC §4): one line, byte-exact, shared by stage-1 targets, the appended
FN tail of stage 2 and the eval GT text.

    {"object_1": {"desc": "red square", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_30|>", "<|coord_40|>"]},
     "object_2": {"desc": "blue triangle", "poly": [["<|coord_5|>", "<|coord_6|>"], ...]}}

(printed on one line). ``json.dumps(..., ensure_ascii=False, separators=(", ", ": "))``; zero objects -> ``{}``.
"""

from __future__ import annotations

import json
import random
from typing import Sequence

from src.data.coords import MAX_BIN, NUM_BINS, coord_token
from src.data.objects import DetObject

SEPARATORS = (", ", ": ")
json_string = json.JSONEncoder(ensure_ascii=False).encode  # str -> its JSON literal, as json.dumps(s, ensure_ascii=False)
_QUOTED_COORD = tuple(json.dumps(coord_token(k)) for k in range(NUM_BINS))  # '"<|coord_k|>"'


def object_value(obj: DetObject) -> dict:
    """The JSON value of one object: ``desc`` first, then its geometry as quoted coord tokens."""
    toks = [coord_token(k) for k in obj.bins]
    if obj.geometry == "bbox_2d":
        geom = toks
    else:
        geom = [[toks[i], toks[i + 1]] for i in range(0, len(toks), 2)]
    return {"desc": obj.desc, obj.geometry: geom}


def serialize_entry(index: int, obj: DetObject) -> str:
    """``"object_{index}": {...}`` exactly as it appears inside the canonical object: the bytes of
    ``json.dumps(f"object_{index}") + ": " + json.dumps(object_value(obj), ensure_ascii=False,
    separators=SEPARATORS)`` (a test keeps them equal), assembled from pre-quoted coord strings
    (~8x faster; it builds every stage-1 target and every stage-2 FN tail)."""
    bins = obj.bins
    if not bins or min(bins) < 0 or max(bins) > MAX_BIN:
        coord_token(next((k for k in bins if not 0 <= k <= MAX_BIN), -1))  # raises naming the bad bin
    quoted = [_QUOTED_COORD[k] for k in bins]
    if obj.geometry == "bbox_2d":
        geom = ", ".join(quoted)
    else:
        if len(quoted) % 2:
            raise ValueError(f"a poly needs an even number of coords, got {len(quoted)}")
        geom = ", ".join(f"[{x}, {y}]" for x, y in zip(quoted[0::2], quoted[1::2]))
    return f'"object_{index}": {{"desc": {json_string(obj.desc)}, {json.dumps(obj.geometry)}: [{geom}]}}'


def serialize_objects(objects: Sequence[DetObject], start_index: int = 1) -> str:
    """The canonical assistant text for ``objects`` (keys numbered from ``start_index``)."""
    return "{" + ", ".join(serialize_entry(start_index + i, o) for i, o in enumerate(objects)) + "}"


def order_indices(objects: Sequence[DetObject], ordering: str = "sorted", rng: random.Random | None = None) -> list[int]:
    """Indices of ``objects`` in target order. ``sorted``: top-to-bottom then left-to-right by
    (min y, min x) of the bins (stable); ``random``: shuffled with ``rng``; ``none``: as given."""
    idx = list(range(len(objects)))
    if ordering == "sorted":
        return sorted(idx, key=lambda i: (min(objects[i].bins[1::2]), min(objects[i].bins[0::2])))
    if ordering == "random":
        (rng or random).shuffle(idx)
        return idx
    if ordering == "none":
        return idx
    raise ValueError(f"unknown object ordering {ordering!r} (expected sorted, random or none)")


def order_objects(objects: Sequence[DetObject], ordering: str = "sorted", rng: random.Random | None = None) -> list[DetObject]:
    """``objects`` in target order (see :func:`order_indices`)."""
    return [objects[i] for i in order_indices(objects, ordering, rng)]
