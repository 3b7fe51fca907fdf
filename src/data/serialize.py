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

from src.data.coords import coord_token
from src.data.objects import DetObject

SEPARATORS = (", ", ": ")


def object_value(obj: DetObject) -> dict:
    """The JSON value of one object: ``desc`` first, then its geometry as quoted coord tokens."""
    toks = [coord_token(k) for k in obj.bins]
    if obj.geometry == "bbox_2d":
        geom = toks
    else:
        geom = [[toks[i], toks[i + 1]] for i in range(0, len(toks), 2)]
    return {"desc": obj.desc, obj.geometry: geom}


def serialize_entry(index: int, obj: DetObject) -> str:
    """``"object_{index}": {...}`` exactly as it appears inside the canonical object."""
    return json.dumps(f"object_{index}") + ": " + json.dumps(object_value(obj), ensure_ascii=False, separators=SEPARATORS)


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
