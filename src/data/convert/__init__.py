"""Converters from COCO, LVIS and ODVG annotation files to the JSONL data contract.

    python -m src.data.convert coco --ann instances_val2017.json --images coco/val2017 --out data/coco/val.jsonl
    python -m src.data.convert lvis --ann lvis_v1_val.json --images coco --out data/lvis/val.jsonl --geometry poly
    python -m src.data.convert odvg --ann train.odvg.jsonl --images DIR --out data/odvg/train.jsonl
    python -m src.data.convert check data/coco/val.jsonl        # validate a JSONL + the same summary

Modules: :mod:`.common` (records, edge-case policy, writing), :mod:`.coco`, :mod:`.lvis`, :mod:`.odvg`
(readers), :mod:`.summary` (the printed summary, token lengths), :mod:`.cli` (the CLI). Every edge
case and what happens to it: docs/datasets.md.
"""

from src.data.convert.cli import convert, main

__all__ = ["convert", "main"]
