"""Strict streaming token-aligned rollout parser (SPEC §6).

    result = parse_rollout(response_ids, token_table(tokenizer))
    result.prefix_ids   # append-ready: response tokens up to the last complete object value '}'
    result.objects      # valid objects in appearance order, with the response positions of their coord tokens

The rollout is the model's answer as token ids (prompt removed). It should read
``{"object_1": {"desc": "cat", "bbox_2d": ["<|coord_1|>", ...]}, "object_2": {...}}`` (SPEC §4), but it
may be truncated, contain garbage, or split punctuation differently from the canonical tokenization.

How it works (one pass, no per-call decoding):

1. Hard stop at the first ``<|im_end|>`` id, or at the first literal ``<|im_end|>`` in the byte stream
   (spelled by ordinary tokens or fused into one); everything from there on is discarded.
2. The tokens' UTF-8 pieces (from the :class:`TokenTable` cache) are joined into one byte buffer and
   lexed once (strings with their escapes, ``{}[]:,``, bare words) while tracking the bracket stack.
   Depth 1 (the top-level object) is checked strictly: ``key : value`` entries separated by ``,``.
   Fast path: at a depth-1 key, an entry spelled exactly as the serializer writes it (SPEC §4:
   ``"object_N": {"desc": "...", "bbox_2d": [...]}`` with ``": "`` / ``", "`` separators, a desc
   without escapes) is read by one regex match and checked without the JSON decoder. Anything
   else (other spacing, escapes, truncation, garbage) takes the general path below, which reaches
   the same verdict on canonical entries (a property test runs both paths on fuzzed rollouts).
3. When a depth-1 entry's value ``{...}`` closes, that ``}`` is a candidate cut, and an ``object_N``
   entry is validated: its exact value bytes must parse as one JSON object with exactly the keys
   ``desc`` (a string that is not blank, as in the data contract) and one of ``bbox_2d`` (4 values
   with x2 > x1 and y2 > y1: an inverted or zero-width/height box is invalid) / ``poly`` (>= 3
   ``[x, y]`` pairs); every value a string that is exactly one coord token. The coord
   tokens are captured BY ID: every coord-token id between the geometry array's ``[`` and ``]``; they
   must agree 1:1 (count and bins) with the parsed values, so a coord spelled with ordinary text
   tokens makes the object invalid. Invalid objects are counted, never repaired.
4. The prefix is cut just after the last candidate ``}``; only the token holding that ``}`` may be
   replaced (by the tokenization of its kept bytes), and only if that round-trips byte-exactly;
   otherwise we back off to the previous candidate.

Counting rules (also in ``ParseResult``'s docstring):

* An *entry* starts at a string in key position at depth 1 (complete or not).
  ``dropped_invalid = entries seen before the stop - len(objects)``: invalid objects, non-``object_N``
  keys, non-object values, the incomplete trailing entry of a truncated rollout, and (rarely) valid
  objects lost to a cut back-off. Entries after the top-level ``}`` are not scanned.
* Exactly one of three endings: the top-level object closed; ``truncated`` (the output ran out at the
  end of tokens or ``<|im_end|>`` before it closed, including an empty answer); ``malformed`` (the
  scan stopped at a byte that breaks the structure: first non-space byte not ``{``, anything but
  whitespace/key/``:``/value/``,``/``}`` at depth 1, a non-JSON bare word as a depth-1 value, or a
  closing bracket of the wrong type at any depth). A malformed rollout is handled as if it ended there.

Nothing here imports transformers or torch.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from typing import Sequence

from src.data.coords import NUM_BINS, coord_token
from src.data.objects import DetObject, control_text_in
from src.rollout_matching.tokens import IM_END, TokenTable

IM_END_BYTES = IM_END.encode("ascii")

# Top level: one significant lexeme after optional JSON whitespace. Every byte is covered by some
# alternative. A '"' that does not start a complete string ``s`` opens one that runs to the end of the
# buffer (no unescaped closing quote follows): ``u``, i.e. truncation.
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_LEX = re.compile(
    rb"[ \t\n\r]*(?:(?P<s>" + _STRING + rb")|(?P<p>[{}\[\]:,])|(?P<u>\")|(?P<b>[^\"{}\[\]:, \t\n\r]+))", re.S
)
# Inside an entry value: skip anything (complete strings whole) up to the next bracket, or to a string
# that runs to the end. Unrolled, so it never backtracks more than linearly. No match: no bracket left.
_INNER = re.compile(
    rb'[^"{}\[\]]*(?:' + _STRING + rb'[^"{}\[\]]*)*(?:(?P<o>[{\[])|(?P<c>[}\]])|(?P<u>"))', re.S
)
_LEADING_WS = re.compile(rb"[ \t\n\r]*")
_OBJECT_KEY = re.compile(rb'"object_([0-9]+)"')
_JSON_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
_GEOMETRY_KEY = re.compile(rb'"(bbox_2d|poly)"[ \t\n\r]*:[ \t\n\r]*\[')
_COORD_TEXT = tuple(coord_token(k) for k in range(NUM_BINS))
# The canonical entry (SPEC §4 serializer output), whole: key digits, desc (no escapes, no control
# characters), then a bbox array of exactly 4 or a poly array of >= 3 pairs, each value one coord text.
_CANON_COORD = rb'"<\|coord_[0-9]+\|>"'
_CANON_PAIR = rb"\[" + _CANON_COORD + rb", " + _CANON_COORD + rb"\]"
_CANON_ENTRY = re.compile(
    rb'[ \t\n\r]*"object_([0-9]+)": \{"desc": "([^"\\\x00-\x1f]*)", '
    rb'(?:"bbox_2d": (\[(?:' + _CANON_COORD + rb", ){3}" + _CANON_COORD + rb"\])"
    rb'|"poly": (\[(?:' + _CANON_PAIR + rb", ){2,}" + _CANON_PAIR + rb"\]))\}"
    rb"(?P<comma>[ \t\n\r]*,)?"  # the separator after it, when there is one
)

_LBRACE, _RBRACE, _LBRACKET, _RBRACKET, _COLON, _COMMA = b"{}[]:,"
# Depth-1 states.
_KEY_OR_CLOSE, _KEY, _COLON_NEXT, _VALUE, _COMMA_OR_CLOSE = range(5)


def _escaped_object_index(key: bytes) -> int | None:
    """N of a key that spells ``object_N`` with JSON escapes (e.g. ``"object_\\u0032"``), else None.

    Rare, but such a key must count in ``max_object_index`` or an appended key would collide with it."""
    if b"\\" not in key:
        return None
    try:
        text = json.loads(key)
    except ValueError:
        return None
    m = re.fullmatch(r"object_([0-9]+)", text) if isinstance(text, str) else None
    return int(m.group(1)) if m else None


def _proper_box(bins: list[int]) -> bool:
    """x2 > x1 and y2 > y1: an inverted or zero-width / zero-height box is an invalid object (the data
    contract's rule for GT boxes), dropped and counted like any other."""
    return bins[2] > bins[0] and bins[3] > bins[1]


@dataclass(frozen=True)
class ParsedObject:
    """One valid predicted object.

    Attributes:
        key: its top-level key, e.g. ``"object_3"``.
        index: N of ``object_N``.
        geometry: ``"bbox_2d"`` or ``"poly"``.
        desc: the decoded description.
        bins: flat ``[x1, y1, x2, y2]`` or ``[x1, y1, ..., xn, yn]``, bins 0..999, in value order.
        coord_positions: 0-based positions in the RESPONSE ids of the coord tokens, 1:1 with ``bins``.
    """

    key: str
    index: int
    geometry: str
    desc: str
    bins: tuple[int, ...]
    coord_positions: tuple[int, ...]

    def to_det_object(self) -> DetObject:
        return DetObject(desc=self.desc, geometry=self.geometry, bins=self.bins)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ParseResult:
    """What :func:`parse_rollout` found.

    Attributes:
        prefix_ids: append-ready prefix. Either the response ids up to the cut (only the last one
            possibly replaced; its text ends with the ``}`` of the last complete depth-1 entry value),
            or, on ``fallback``, the fresh tokenization of ``"{"``.
        objects: valid objects kept in the prefix, in appearance order (duplicates stay separate).
        dropped_invalid: depth-1 entries seen before the stop that are not in ``objects``: invalid
            objects, non-``object_N`` keys, non-object values (kept in the prefix when before the cut),
            the incomplete last entry, and valid objects lost to a cut back-off.
        truncated: the output ran out (end of ids or ``<|im_end|>``) before the top-level ``}``
            (also when it ran out before any ``{``, e.g. an empty answer).
        max_object_index: max N over all ``object_N`` keys kept in the prefix (valid or not); None if none.
        fallback: the prefix is the fresh ``{``: the first non-space byte is not ``{``, no depth-1 entry
            value ``{...}`` completed, or every candidate cut backed off.
        stopped_at_im_end: the scan stopped at an ``<|im_end|>`` (id or literal text).
        cut_backoffs: how often a cut inside a fused token did not round-trip and an earlier one was used.
        num_response_tokens: tokens scanned (at least partly) before the hard stop.
        malformed: the scan stopped at a structure error, as if the output ended there (never together
            with ``truncated``; neither is set when the top-level object closed).
        incomplete_entry: the last entry seen was cut off mid-way (it is counted in ``dropped_invalid``).
    """

    prefix_ids: tuple[int, ...]
    objects: tuple[ParsedObject, ...]
    dropped_invalid: int
    truncated: bool
    max_object_index: int | None
    fallback: bool
    stopped_at_im_end: bool
    cut_backoffs: int
    num_response_tokens: int
    malformed: bool = False
    incomplete_entry: bool = False


def prefix_text(result: ParseResult, table: TokenTable) -> str:
    """The prefix as text (always ends with ``}`` or is the fallback ``{``)."""
    return table.text(result.prefix_ids)


@dataclass
class _Entry:
    """A depth-1 entry while scanning. ``end`` = byte after its value (-1 while incomplete)."""

    key_start: int
    index: int | None  # N of an object_N key, else None
    end: int = -1
    obj: ParsedObject | None = None


class _JsonObject:
    """``object_pairs_hook`` result: keeps duplicate keys visible and is never a list or str."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, object]]):
        self.pairs = pairs


_DECODER = json.JSONDecoder(object_pairs_hook=_JsonObject)


def parse_rollout(response_ids: Sequence[int], table: TokenTable) -> ParseResult:
    """Parse a rollout's response ids (prompt removed) strictly; see the module docstring.

    ``response_ids``: a sequence of ints (a list, tuple, numpy array or tensor). Never raises on any
    id sequence; ids outside the table read as a NUL byte (never valid JSON).
    """
    if hasattr(response_ids, "tolist"):  # numpy array / torch tensor
        ids = response_ids.tolist()
    else:
        ids = response_ids if type(response_ids) is list else list(response_ids)
    pieces_of = table.pieces
    try:
        n_before_end = ids.index(table.im_end_id)
    except ValueError:
        n_before_end = len(ids)
    scanned = ids[:n_before_end]
    if scanned and (min(scanned) < 0 or max(scanned) >= len(pieces_of)):
        pcs = [table.piece(i) for i in scanned]
    elif len(scanned) > 1:
        pcs = list(itemgetter(*scanned)(pieces_of))  # C-level gather, ~2x a list comprehension
    else:
        pcs = [pieces_of[i] for i in scanned]
    buf = b"".join(pcs)
    starts = list(accumulate(map(len, pcs), initial=0))  # starts[t] = first byte of token t; [-1] = len(buf)

    stopped_at_im_end = n_before_end < len(ids)
    num_tokens = n_before_end
    literal = buf.find(IM_END_BYTES)
    if literal >= 0:
        stopped_at_im_end = True
        t = bisect_right(starts, literal) - 1
        num_tokens = t + (starts[t] < literal)
        buf = buf[:literal]

    scan = _Scan(buf, ids, starts, table)
    scan.run()
    return scan.result(ids, pcs, starts, table, stopped_at_im_end, num_tokens)


class _Scan:
    """The single pass over the byte buffer. Kept as a small class so ``result`` can read its state."""

    def __init__(self, buf: bytes, ids: list[int], starts: list[int], table: TokenTable):
        self.buf, self.ids, self.starts = buf, ids, starts
        self.coord_of = table.bin_by_id
        self.coord_pos: list[int] | None = None  # positions of the coord-token ids (built on first use)
        self.coord_starts: list[int] = []  # their first bytes, ascending
        self.coord_bins: list[int] = []  # their bins
        self.entries: list[_Entry] = []
        self.cuts: list[int] = []  # byte offsets just after a complete depth-1 entry value '}'
        self.closed = False
        self.malformed = False

    def run(self) -> None:
        """Scan ``buf``; fills ``entries`` / ``cuts`` and sets ``closed`` or ``malformed`` (else: truncated)."""
        buf = self.buf
        pos = _LEADING_WS.match(buf).end()
        if pos == len(buf):
            return  # empty answer: truncated
        if buf[pos] != _LBRACE:
            self.malformed = True
            return
        pos += 1
        stack = [_RBRACE]  # expected closers; depth = len(stack)
        state = _KEY_OR_CLOSE  # depth-1 grammar state
        entry: _Entry | None = None  # the depth-1 entry being read
        value_start = -1  # byte of the current entry value's '{' (-1: the value is not an object)
        geom_key, geom_open = "", -1  # geometry array being read: its key and the byte of its '['
        geom_span: tuple[str, int, int] | None = None  # (key, '[' byte, byte after ']') of the last one

        while True:
            if len(stack) == 1:  # the top-level object: strict JSON grammar, lexeme by lexeme
                if state == _KEY_OR_CLOSE or state == _KEY:
                    m = _CANON_ENTRY.match(buf, pos)  # fast path: a canonical entry, whole
                    if m is not None:
                        comma = m.start("comma")  # -1 when no separator followed
                        end = comma if comma >= 0 else m.end()  # just after the value's '}'
                        entry = _Entry(m.start(1) - len(b'"object_'), int(m.group(1)), end=end)
                        self.entries.append(entry)
                        self.cuts.append(end)
                        entry.obj = self._canonical_object(m)
                        pos, state = m.end(), (_KEY if comma >= 0 else _COMMA_OR_CLOSE)
                        continue
                m = _LEX.match(buf, pos)
                if m is None:
                    return  # only whitespace left: truncated
                kind, pos = m.lastgroup, m.end()
                if kind == "p":
                    c = buf[pos - 1]
                    if c == _COLON and state == _COLON_NEXT:
                        state = _VALUE
                    elif c == _COMMA and state == _COMMA_OR_CLOSE:
                        state = _KEY
                    elif c == _RBRACE and (state == _KEY_OR_CLOSE or state == _COMMA_OR_CLOSE):
                        self.closed = True
                        return
                    elif c == _LBRACE and state == _VALUE:
                        stack.append(_RBRACE)
                        value_start, geom_span = pos - 1, None
                    elif c == _LBRACKET and state == _VALUE:
                        stack.append(_RBRACKET)
                        value_start = -1
                    else:
                        self.malformed = True
                        return
                elif kind == "s":
                    if state == _KEY_OR_CLOSE or state == _KEY:
                        key_start = m.start("s")
                        km = _OBJECT_KEY.fullmatch(buf, key_start, pos)
                        index = int(km.group(1)) if km else _escaped_object_index(buf[key_start:pos])
                        entry = _Entry(key_start, index)
                        self.entries.append(entry)
                        state = _COLON_NEXT
                    elif state == _VALUE:  # a string value: an invalid entry
                        entry.end = pos  # type: ignore[union-attr]
                        state = _COMMA_OR_CLOSE
                    else:
                        self.malformed = True
                        return
                elif kind == "b":
                    if state != _VALUE:
                        self.malformed = True
                        return
                    if pos == len(buf):
                        return  # a scalar that may go on: truncated
                    if not _JSON_SCALAR.fullmatch(buf, m.start("b"), pos):
                        self.malformed = True
                        return
                    entry.end = pos  # type: ignore[union-attr]  # a scalar value: an invalid entry
                    state = _COMMA_OR_CLOSE
                else:  # "u": a string that runs to the end of the buffer
                    if state == _KEY_OR_CLOSE or state == _KEY:
                        self.entries.append(_Entry(m.start("u"), None))
                    elif state != _VALUE:
                        self.malformed = True
                    return
                continue

            # Inside an entry value: jump from bracket to bracket (strings skipped whole); the JSON
            # decoder judges everything in between once the value closes (``_validate``).
            m = _INNER.match(buf, pos)
            if m is None:
                return  # no bracket before the end: truncated
            kind, pos = m.lastgroup, m.end()
            if kind == "o":
                if len(stack) == 2 and buf[pos - 1] == _LBRACKET:
                    gm = _GEOMETRY_KEY.search(buf, m.start(), pos)
                    if gm is not None and gm.end() == pos:
                        geom_key, geom_open = gm.group(1).decode(), pos - 1
                stack.append(_RBRACE if buf[pos - 1] == _LBRACE else _RBRACKET)
            elif kind == "c":
                if stack.pop() != buf[pos - 1]:
                    self.malformed = True  # a bracket closed by the wrong type
                    return
                if len(stack) == 2 and geom_open >= 0:
                    geom_span, geom_open = (geom_key, geom_open, pos), -1
                elif len(stack) == 1:
                    entry.end = pos  # type: ignore[union-attr]
                    state = _COMMA_OR_CLOSE
                    if value_start >= 0:
                        self.cuts.append(pos)
                        if entry.index is not None:  # type: ignore[union-attr]
                            entry.obj = self._validate(entry, value_start, pos, geom_span)  # type: ignore[arg-type]
            else:  # "u": a string that runs to the end of the buffer
                return

    def _validate(self, entry: _Entry, start: int, end: int, geom_span: tuple[str, int, int] | None,
                  ) -> ParsedObject | None:
        """The object whose value is ``buf[start:end]`` if it is valid (SPEC §6), else None."""
        if geom_span is None:
            return None
        try:
            text = self.buf[start:end].decode("utf-8")
            value, stop = _DECODER.raw_decode(text)  # starts at '{': always a _JsonObject
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            return None
        if stop != len(text):
            return None
        pairs = value.pairs
        geometry = geom_span[0]
        if len(pairs) != 2 or pairs[0][0] == pairs[1][0]:
            return None  # not exactly two distinct keys
        fields = dict(pairs)
        desc = fields.get("desc")
        if type(desc) is not str or not desc.strip() or control_text_in(desc) is not None or geometry not in fields:
            return None
        values = fields[geometry]
        if type(values) is not list:
            return None
        if geometry == "bbox_2d":
            if len(values) != 4:
                return None
            flat = values
        else:
            if len(values) < 3 or any(type(p) is not list or len(p) != 2 for p in values):
                return None
            flat = [v for p in values for v in p]
        captured = self._capture(geom_span[1], geom_span[2], len(flat))
        if captured is None:
            return None
        positions, bins = captured
        # Values 1:1 with captured tokens. With equal counts, each string (one coord text) holds exactly
        # one captured id, so the string is exactly that token: spelled-out coord texts never pass.
        if flat != [_COORD_TEXT[b] for b in bins]:
            return None
        if geometry == "bbox_2d" and not _proper_box(bins):
            return None
        index: int = entry.index  # type: ignore[assignment]  # only object_N entries are validated
        return ParsedObject(f"object_{index}", index, geometry, desc, tuple(bins), tuple(positions))

    def _canonical_object(self, m: re.Match) -> ParsedObject | None:
        """``_validate`` for a ``_CANON_ENTRY`` match: the regex already fixed the keys, the array
        shapes and the value spelling, so only the desc text and the capture by id are left."""
        try:
            desc = m.group(2).decode("utf-8")  # no escapes: the JSON string value is its bytes
        except UnicodeDecodeError:
            return None
        if not desc.strip() or control_text_in(desc) is not None:
            return None
        geometry, group = ("bbox_2d", 3) if m.group(3) is not None else ("poly", 4)
        array = m.group(group)
        captured = self._capture(m.start(group), m.end(group), array.count(b"<"))
        if captured is None:
            return None
        positions, bins = captured
        # No value-text check needed: every value is one coord text and '<' starts each, so a coord
        # token (bytes '<|coord_k|>', no quote or bracket) can only sit inside a value, at most one per
        # value, spanning it whole. Equal counts = each value IS one coord token's text.
        if geometry == "bbox_2d" and not _proper_box(bins):
            return None
        index = int(m.group(1))
        return ParsedObject(f"object_{index}", index, geometry, desc, tuple(bins), tuple(positions))

    def _capture(self, open_b: int, close_b: int, count: int) -> tuple[list[int], list[int]] | None:
        """Capture by id: the positions and bins of the coord-token ids strictly between the geometry
        array's '[' (byte ``open_b``) and ']' (byte ``close_b - 1``); None unless there are ``count``.

        A coord token's bytes hold no bracket, so "strictly between" = its first byte is in
        (``open_b``, ``close_b``): two bisections over the coord tokens' first bytes."""
        if self.coord_pos is None:
            coord_of, starts = self.coord_of, self.starts
            self.coord_pos = [t for t, i in enumerate(self.ids[: len(starts) - 1]) if i in coord_of]
            self.coord_starts = [starts[t] for t in self.coord_pos]
            self.coord_bins = [coord_of[self.ids[t]] for t in self.coord_pos]
        lo = bisect_right(self.coord_starts, open_b)
        hi = bisect_left(self.coord_starts, close_b)
        if hi - lo != count:
            return None
        return self.coord_pos[lo:hi], self.coord_bins[lo:hi]

    def result(self, ids: list[int], pcs: list[bytes], starts: list[int], table: TokenTable,
               stopped_at_im_end: bool, num_tokens: int) -> ParseResult:
        entries = self.entries
        common = dict(
            truncated=not self.closed and not self.malformed, stopped_at_im_end=stopped_at_im_end,
            num_response_tokens=num_tokens, malformed=self.malformed,
            incomplete_entry=bool(entries) and entries[-1].end < 0,
        )
        backoffs = 0
        for cut in reversed(self.cuts):
            prefix = _prefix_at(cut, ids, pcs, starts, table)
            if prefix is not None:
                break
            backoffs += 1
        else:
            return ParseResult(
                prefix_ids=tuple(table.encode("{")), objects=(), dropped_invalid=len(entries),
                max_object_index=None, fallback=True, cut_backoffs=backoffs, **common,
            )
        kept = [e for e in entries if e.key_start < cut]
        objects = tuple(e.obj for e in kept if e.obj is not None)
        indices = [e.index for e in kept if e.index is not None]
        return ParseResult(
            prefix_ids=prefix, objects=objects, dropped_invalid=len(entries) - len(objects),
            max_object_index=max(indices) if indices else None, fallback=False, cut_backoffs=backoffs, **common,
        )


def _prefix_at(cut: int, ids: list[int], pcs: list[bytes], starts: list[int], table: TokenTable,
               ) -> tuple[int, ...] | None:
    """Ids whose bytes are exactly ``buf[:cut]``: unchanged ids up to the token holding byte
    ``cut - 1``, that token replaced by the tokenization of its kept part when the cut falls inside it.
    None when that replacement does not round-trip byte-exactly."""
    t = bisect_right(starts, cut - 1) - 1
    if starts[t + 1] == cut:
        return tuple(ids[: t + 1])
    kept = pcs[t][: cut - starts[t]]
    try:
        new = table.encode(kept.decode("utf-8"))
    except UnicodeDecodeError:  # the token begins inside a multi-byte character
        return None
    if b"".join(table.piece(i) for i in new) != kept:
        return None
    return tuple(ids[:t]) + tuple(new)
