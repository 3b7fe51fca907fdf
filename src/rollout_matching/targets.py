"""SerializeAppend, Y_train and per-token supervision (SPEC §8-§10).

    Y_train = prefix_ids + tokenize(fragment) + [<|im_end|>]

* fragment = (", " if the prefix's last non-space char is "}", nothing if it is "{" or ",") + the FN
  objects serialised exactly as SPEC §4 with keys ``object_{max_object_index + 1}``... + "}".
  No FN: the fragment is just "}". The parser always cuts right after an object's "}" (or falls back
  to "{"), so a prefix never ends in ","; one that did could not be closed without FN (TargetError).
* Prefix: ONLY the coord tokens of matched objects are supervised (coord loss, targets from
  :func:`src.rollout_matching.ot.prefix_targets`); FP and invalid objects get no loss at all.
* Tail (fragment + EOS): CE on every non-coord token except tokens overlapping a ``desc`` string
  VALUE (the characters between its quotes); coord tokens get the coord loss with their own bins.
  The token holding the closing "}" and the EOS are CE-supervised iff ``supervise_eos``.

Positions here are 0-based indices into Y_train (the assistant span); the trainer adds the prompt
length. Nothing here imports transformers.
"""

from __future__ import annotations

import unicodedata
import random
from dataclasses import dataclass
from itertools import repeat
from typing import Literal, Sequence

from src.data.objects import DetObject
from src.data.serialize import json_string, order_indices, serialize_entry
from src.rollout_matching.matcher import MatchResult
from src.rollout_matching.ot import prefix_targets_batch
from src.rollout_matching.parser import ParseResult
from src.rollout_matching.tokens import TokenTable

Segment = Literal["prefix", "tail"]


class TargetError(RuntimeError):
    """An internal invariant broke while building Y_train (a bug, never bad user input)."""


class ControlTokenError(ValueError):
    """GT text encoded to a tokenizer control token (a desc spelling an added token the data contract's
    pattern does not know): the target would hold a stop or coord token inside a desc."""


def check_plain_encoding(ids: Sequence[int], objects: Sequence[DetObject], table: TokenTable, what: str) -> None:
    """``ids`` (the tokenization of the serialized ``objects``) may hold coord tokens exactly where the
    serializer wrote coordinates and no other control token; raise :class:`ControlTokenError` otherwise."""
    controls = table.control_ids.intersection(ids)
    n_coords = sum(map(table.bin_by_id.__contains__, ids))
    expected = sum(len(o.bins) for o in objects)
    if controls or n_coords != expected:
        found = f"control token(s) {sorted(table.piece(i).decode('utf-8', 'replace') for i in controls)}" if controls \
            else f"{n_coords} coord tokens where the geometry has {expected}"
        raise ControlTokenError(f"{what} encodes {found}: a desc spells a tokenizer control token; rewrite that desc")


@dataclass(frozen=True)
class Fragment:
    """The appended text and the byte spans (within its UTF-8 encoding) of each desc VALUE."""

    text: str
    desc_spans: tuple[tuple[int, int], ...]
    close_byte: int  # byte offset of the final top-level "}"
    first_index: int
    num_objects: int


@dataclass(frozen=True)
class TrainTarget:
    """Y_train with its supervision. ``ce_positions`` / ``coord_targets`` index ``y_ids``."""

    y_ids: tuple[int, ...]
    prefix_len: int
    fragment: Fragment
    ce_positions: tuple[int, ...]
    coord_targets: tuple[tuple[int, int, Segment], ...]  # (pos, bin, segment)
    matched_for_supervision: int   # matched pairs whose prefix coords are supervised
    excluded_from_supervision: int  # valid predictions without any supervision (FP + failed targets)
    fn_appended: int
    fn_gt: tuple[int, ...] = ()            # GT indices appended, in appended order
    supervised_pairs: tuple[tuple[int, int], ...] = ()  # (pred_i, gt_j) whose prefix coords are supervised

    def supervision_arrays(self) -> tuple[list[int], list[int], list[int]]:
        """Per-Y_train-token (ce_targets with -100, coord_bins with -1, segment 0 prefix / 1 tail)."""
        n = len(self.y_ids)
        ce, bins, seg = [-100] * n, [-1] * n, [1] * n
        for p in self.ce_positions:
            ce[p] = self.y_ids[p]
        for p, b, s in self.coord_targets:
            bins[p] = b
            seg[p] = 0 if s == "prefix" else 1
        return ce, bins, seg


def build_fragment(prefix_text: str, fn_objects: Sequence[DetObject], first_index: int) -> Fragment:
    """SerializeAppend: the text appended after the prefix (ends with the top-level "}")."""
    last = prefix_text.rstrip()[-1:] if prefix_text.strip() else ""
    if last == "," and not fn_objects:
        # Cannot happen with parse_rollout (it cuts right after a "}"); closing "...,}" would be invalid JSON.
        raise TargetError("a prefix ending in ',' needs at least one appended object")
    if last == "}":
        lead = ", " if fn_objects else ""
    elif last in ("{", ","):
        lead = ""
    else:
        raise TargetError(f"prefix must end with '{{', '}}' or ',' (got {prefix_text[-20:]!r})")
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = len(lead.encode())
    for i, obj in enumerate(fn_objects):
        # Qwen's tokenizer NFC-normalises text; serialise the normalised desc so the fragment's tokens
        # reproduce its bytes exactly (the data loader already stores desc in NFC).
        obj = DetObject(unicodedata.normalize("NFC", obj.desc), obj.geometry, obj.bins)
        if i:
            parts.append(", ")
            pos += 2
        head = f'"object_{first_index + i}": {{"desc": '
        desc = json_string(obj.desc)
        entry = serialize_entry(first_index + i, obj)
        if not entry.startswith(head + desc):
            raise TargetError("serialize_entry must serialise desc first")
        start = pos + len(head.encode()) + 1  # after the opening quote
        spans.append((start, start + len(desc.encode()) - 2))  # the characters between the quotes
        parts.append(entry)
        pos += len(entry.encode())
    text = lead + "".join(parts) + "}"
    return Fragment(text=text, desc_spans=tuple(spans), close_byte=len(text.encode()) - 1, first_index=first_index, num_objects=len(fn_objects))


def build_train_target(
    parsed: ParseResult,
    gts: Sequence[DetObject],
    match: MatchResult,
    table: TokenTable,
    *,
    ot_cost: str = "l2",
    ot_epsilon: float = 10.0,
    ot_iters: int = 30,
    supervise_eos: bool = True,
    fn_ordering: str = "sorted",
    rng: random.Random | None = None,
) -> TrainTarget:
    """Y_train and its supervision for one sample (SPEC §8-§10)."""
    prefix = list(parsed.prefix_ids)
    P = len(prefix)
    coord_targets: list[tuple[int, int, Segment]] = []
    failed_gt: list[int] = []
    supervised: list[tuple[int, int]] = []
    all_bins = prefix_targets_batch(
        [(parsed.objects[i].to_det_object(), gts[j]) for i, j in match.matches], ot_cost=ot_cost, ot_epsilon=ot_epsilon, ot_iters=ot_iters
    )
    for (pred_i, gt_j), bins in zip(match.matches, all_bins):
        positions = parsed.objects[pred_i].coord_positions
        if len(bins) != len(positions) or set(map(type, bins)) != {int} or min(bins) < 0 or max(bins) > 999:
            failed_gt.append(gt_j)  # cannot build targets: no prefix loss, the GT object is appended
            continue
        supervised.append((pred_i, gt_j))
        coord_targets.extend(zip(positions, bins, repeat("prefix")))

    fn_idx = sorted(set(match.fn) | set(failed_gt))
    fn_gt = tuple(fn_idx[k] for k in order_indices([gts[j] for j in fn_idx], fn_ordering, rng))
    fn_objects = [gts[j] for j in fn_gt]
    first = (parsed.max_object_index or 0) + 1
    frag = build_fragment(table.text(prefix[-8:]), fn_objects, first)  # only its last non-space char matters
    frag_ids = table.encode_serialized(frag.text)
    check_plain_encoding(frag_ids, fn_objects, table, "the FN tail")
    y_ids = prefix + frag_ids + [table.im_end_id]

    # Tail supervision from byte spans of the fragment's tokens (desc spans are sorted: one pointer).
    num_prefix = len(coord_targets)
    ce_positions: list[int] = []
    offset = 0
    spans = frag.desc_spans
    si = 0
    piece, bin_by_id = table.piece, table.bin_by_id
    for k, tid in enumerate(frag_ids):
        s, e = offset, offset + len(piece(tid))
        offset = e
        pos = P + k
        b = bin_by_id.get(tid)
        if b is not None:
            coord_targets.append((pos, b, "tail"))
            continue
        while si < len(spans) and spans[si][1] <= s:
            si += 1
        if si < len(spans) and s < spans[si][1] and e > spans[si][0]:
            continue  # overlaps a desc value: masked in stage 2
        if s <= frag.close_byte < e and not supervise_eos:
            continue
        ce_positions.append(pos)
    if offset != len(frag.text.encode()):
        raise TargetError("fragment tokens do not reproduce the fragment bytes")
    if supervise_eos:
        ce_positions.append(len(y_ids) - 1)

    # Invariants, checked with C-level min/max/set ops: every coord target sits on a coord token of
    # Y_train, prefix targets (appended first) before P, tail targets after it.
    positions = [t[0] for t in coord_targets]
    n_y = len(y_ids)
    if positions and (
        min(positions) < 0 or max(positions) >= n_y or not bin_by_id.keys() >= {y_ids[p] for p in positions}
        or max(positions[:num_prefix], default=-1) >= P or min(positions[num_prefix:], default=P) < P
    ):
        for pos, _, seg in coord_targets:
            if not 0 <= pos < n_y or y_ids[pos] not in bin_by_id:
                raise TargetError(f"coord target at {pos} ({seg}) is not a coord token of Y_train")
            if (seg == "prefix") != (pos < P):
                raise TargetError(f"{seg} coord target at {pos} on the wrong side of the prefix ({P})")
    if ce_positions and (ce_positions[0] < P or ce_positions[-1] >= n_y):  # ascending by construction
        raise TargetError("CE position outside the tail")
    return TrainTarget(
        y_ids=tuple(y_ids), prefix_len=P, fragment=frag, ce_positions=tuple(ce_positions),
        coord_targets=tuple(sorted(coord_targets)), matched_for_supervision=len(supervised),
        excluded_from_supervision=len(parsed.objects) - len(supervised), fn_appended=len(fn_objects),
        fn_gt=fn_gt, supervised_pairs=tuple(supervised),
    )

