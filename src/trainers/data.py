"""Dataset wrapper and the stage-1 collator."""

from __future__ import annotations

import random
from typing import Sequence

from torch.utils.data import Dataset

from src.data.contract import DataError, Record
from src.data.images import load_image
from src.data.prompt import prompt_text
from src.data.serialize import order_objects, serialize_objects
from src.rollout_matching.targets import ControlTokenError, check_plain_encoding
from src.rollout_matching.tokens import token_table
from src.rollout.encoding import encode_prompt
from src.trainers.batches import SupervisedSequence, right_padded_teacher_forced


class RecordDataset(Dataset):
    """Validated records; items are ``{"record": Record, "index": i}`` (raw, for our collators)."""

    def __init__(self, records: Sequence[Record]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"record": self.records[i], "index": i}



class SFTCollator:
    """Stage 1: chat-encode image + prompt + canonical GT answer (SPEC §4-§5).

    Assistant tokens: coord tokens get the coord loss with their own bin, every other assistant token
    (JSON structure, desc, the final ``<|im_end|>``) gets full-vocab CE; prompt positions are ignored.
    """

    def __init__(self, processor, object_ordering: str = "sorted", seed: int = 0):
        self.processor = processor
        self.table = token_table(processor.tokenizer)
        self.prompt = prompt_text(processor)
        self.ordering = object_ordering
        self.rng = random.Random(seed)
        self.pad_id = processor.tokenizer.pad_token_id

    def answer_ids(self, record: Record) -> list[int]:
        """The canonical GT answer's ids + ``<|im_end|>``; a desc that encodes to a control token is a
        :class:`DataError` naming the record (never a stop or coord token inside a desc)."""
        objects = order_objects(record.objects, self.ordering, self.rng)
        ids = self.table.encode(serialize_objects(objects))
        try:
            check_plain_encoding(ids, objects, self.table, "the GT answer")
        except ControlTokenError as e:
            raise DataError(f"{record.source}: {e}") from None
        return ids + [self.table.im_end_id]

    def sequence(self, record: Record) -> SupervisedSequence:
        image = load_image(record.image, record.source)
        prompt = encode_prompt(self.processor, image, self.prompt)
        ids = self.answer_ids(record)
        bins = [self.table.bin_of(i) for i in ids]
        ce = [i if b < 0 else -100 for i, b in zip(ids, bins)]
        return SupervisedSequence(prompt=prompt, assistant_ids=ids, ce_targets=ce, coord_bins=bins)

    def __call__(self, items: list[dict]) -> dict:
        return right_padded_teacher_forced([self.sequence(it["record"]) for it in items], self.pad_id)
