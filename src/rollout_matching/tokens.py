"""Per-id text pieces and coord-bin lookup, built once per tokenizer (SPEC §6 "per-id piece cache").

Pieces are the token's UTF-8 BYTES, not decoded text: byte-level BPE can split one multi-byte
character across tokens, and ``decode([id])`` would then give U+FFFD. JSON structure characters are
ASCII, and UTF-8 continuation bytes are >= 0x80, so a byte-wise scan can never confuse the two.

This module is duck-typed over a Hugging Face tokenizer (``convert_ids_to_tokens``,
``get_added_vocab``, ``__call__``/``encode``) and never imports transformers.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np

from src.data.coords import NUM_BINS, coord_token, parse_coord_token
from src.data.objects import CONTROL_TEXT

COORD_PREFIX = "<|coord_"
IM_END = "<|im_end|>"
UNKNOWN_PIECE = b"\x00"  # ids the tokenizer does not know (e.g. padded embedding rows): never valid JSON


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen byte-level table: byte value -> the printable unicode char that stands for it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@dataclass(frozen=True, eq=False)
class TokenTable:
    """Everything the parser and the target builder need to know about a tokenizer.

    Attributes:
        pieces: id -> UTF-8 bytes of that token's text (added tokens: their literal content).
        coord_bin: int32 [V]; bin 0..999 of a coord token id, -1 otherwise.
        coord_ids: int64 [1000]; id of ``<|coord_k|>`` at index k.
        im_end_id: id of ``<|im_end|>`` (the chat end token = EOS of the assistant turn).
        encode: plain-text tokenization without special tokens added (coord tokens stay atomic).
        bin_by_id: coord-token id -> bin (the cheapest per-id check in Python loops).
        control_ids: ids of the tokenizer's other added / special tokens (``<|im_end|>``, ``<|vision_pad|>``,
            ``<think>``, ...): never expected inside the text a serializer wrote.
    """

    pieces: tuple[bytes, ...]
    coord_bin: np.ndarray
    coord_ids: np.ndarray
    im_end_id: int
    encode: Callable[[str], list[int]]
    bin_by_id: dict[int, int] = field(default_factory=dict)
    encode_batch: Callable[[list[str]], list[list[int]]] | None = None
    control_ids: frozenset[int] = frozenset()
    _segments: "SegmentCache" = field(default_factory=lambda: SegmentCache(), repr=False)

    def __post_init__(self) -> None:
        if not self.bin_by_id:
            ids = np.flatnonzero(self.coord_bin >= 0)
            object.__setattr__(self, "bin_by_id", dict(zip(ids.tolist(), self.coord_bin[ids].tolist())))

    def piece(self, token_id: int) -> bytes:
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else UNKNOWN_PIECE

    def is_coord(self, token_id: int) -> bool:
        return token_id in self.bin_by_id

    def bin_of(self, token_id: int) -> int:
        """Bin of a coord token id; -1 for any other id."""
        return self.bin_by_id.get(token_id, -1)

    def encode_serialized(self, text: str) -> list[int]:
        """``encode(text)`` for serializer output (many coord tokens, few distinct texts between them),
        ~3x faster: coord tokens are looked up, the text between two coord tokens is tokenized once and
        cached. Equal to ``encode`` because a tokenizer splits its input at added tokens before
        pre-tokenizing; the first ``SegmentCache.VERIFY`` calls compare with ``encode`` and switch this
        off for good on any difference (a tokenizer that tokenizes across added tokens)."""
        return self._segments.encode(self, text)

    def text(self, ids: Sequence[int]) -> str:
        """Decode ids to text exactly as the pieces concatenate (invalid UTF-8 replaced)."""
        return b"".join(self.piece(i) for i in ids).decode("utf-8", errors="replace")

    @classmethod
    def from_pieces(cls, pieces: Sequence[bytes], encode: Callable[[str], list[int]], im_end_id: int,
                    encode_batch: Callable[[list[str]], list[list[int]]] | None = None,
                    control_ids: Iterable[int] | None = None) -> "TokenTable":
        """Build from raw pieces (tests and non-HF tokenizers). Coord tokens are found by content;
        ``control_ids`` default to the ids whose piece is exactly a control-token text (:data:`CONTROL_TEXT`)."""
        coord_bin = np.full(len(pieces), -1, dtype=np.int32)
        coord_ids = np.full(NUM_BINS, -1, dtype=np.int64)
        for i, p in enumerate(pieces):
            if p.startswith(b"<|coord_"):
                k = parse_coord_token(p.decode("utf-8", errors="replace"))
                if k is not None:
                    coord_bin[i] = k
                    coord_ids[k] = i
        if (coord_ids < 0).any():
            missing = int(np.flatnonzero(coord_ids < 0)[0])
            raise ValueError(f"tokenizer lacks <|coord_{missing}|> (and maybe others); add the coord tokens first")
        if control_ids is None:
            control_ids = [i for i, p in enumerate(pieces) if coord_bin[i] < 0 and CONTROL_TEXT.fullmatch(p.decode("utf-8", errors="replace"))]
        return cls(tuple(pieces), coord_bin, coord_ids, int(im_end_id), encode, encode_batch=encode_batch,
                   control_ids=frozenset(int(i) for i in control_ids) | {int(im_end_id)})


_COORD_TEXT_SPLIT = re.compile(r"(<\|coord_(?:0|[1-9][0-9]{0,2})\|>)")  # exactly the 1000 coord-token texts


class SegmentCache:
    """The cache behind :meth:`TokenTable.encode_serialized` (bounded; cleared when full)."""

    VERIFY = 16  # calls checked against the plain encode before the cache is trusted
    MAX_ENTRIES = 20_000  # ~17 MB (measured ~860 B per entry); the common separators come back at once

    def __init__(self) -> None:
        self.ids: dict[str, list[int]] = {}
        self.checked = 0
        self.enabled = True

    def encode(self, table: "TokenTable", text: str) -> list[int]:
        if not self.enabled:
            return table.encode(text)
        parts = _COORD_TEXT_SPLIT.split(text)  # text, coord text, text, coord text, ..., text
        cache = self.ids
        missing = list({p for p in parts[0::2] if p and p not in cache})
        if missing:
            if len(cache) + len(missing) > self.MAX_ENTRIES:
                cache.clear()
            encoded = table.encode_batch(missing) if table.encode_batch is not None else [table.encode(m) for m in missing]
            cache.update(zip(missing, encoded))
        coord_ids = table.coord_ids
        out: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                out.append(int(coord_ids[int(part[8:-2])]))  # '<|coord_' ... '|>'
            elif part:
                out += cache[part]
        if self.checked < self.VERIFY:
            self.checked += 1
            if out != table.encode(text):
                self.enabled = False  # this tokenizer does not split at added tokens: plain encode from now on
                return table.encode(text)
        return out


_CACHE: "weakref.WeakKeyDictionary[object, TokenTable]" = weakref.WeakKeyDictionary()
_CACHE_BY_ID: dict[int, TokenTable] = {}


def token_table(tokenizer) -> TokenTable:
    """The (cached) :class:`TokenTable` of a Hugging Face tokenizer or processor. ~0.3 s the first time."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # accept a processor
    try:
        cached = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = _CACHE_BY_ID.get(id(tokenizer))
    if cached is not None and len(cached.pieces) == len(tokenizer):
        return cached
    table = _build(tokenizer)
    try:
        _CACHE[tokenizer] = table
    except TypeError:
        _CACHE_BY_ID[id(tokenizer)] = table
    return table


def _build(tokenizer) -> TokenTable:
    n = len(tokenizer)
    added = {content: i for content, i in tokenizer.get_added_vocab().items()}
    added_by_id = {i: c for c, i in added.items()}
    dec = _byte_decoder()
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    pieces: list[bytes] = []
    for i, t in enumerate(tokens):
        if i in added_by_id:
            pieces.append(added_by_id[i].encode("utf-8"))
        elif t is None:
            pieces.append(UNKNOWN_PIECE)
        else:
            try:
                pieces.append(bytes(dec[c] for c in t))
            except KeyError:  # not a byte-level vocabulary: fall back to the token's own text
                pieces.append(t.encode("utf-8"))
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if im_end is None or im_end == getattr(tokenizer, "unk_token_id", None):
        raise ValueError("tokenizer has no <|im_end|> token; only Qwen chat tokenizers are supported")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer: one call for many texts
    encode_batch = None
    if backend is not None:
        def encode_batch(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    coord_texts = {coord_token(k) for k in range(NUM_BINS)}
    control = [i for c, i in added.items() if c not in coord_texts]
    return TokenTable.from_pieces(pieces, encode, im_end, encode_batch=encode_batch, control_ids=control)
