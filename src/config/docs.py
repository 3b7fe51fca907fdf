"""Generate the config reference (``docs/config.md``) from the typed schema, so it cannot drift.

    python -m src.config.docs > docs/config.md
"""

from __future__ import annotations

import dataclasses
import typing

from src.config.loader import _type_name
from src.config.schema import META_FIELDS, TRAINING_DEFAULTS, Config, TrainingConfig

HEADER = """# Config reference

Generated from `src/config/schema.py` by `python -m src.config.docs > docs/config.md`
(a test fails when this page is stale). Every key is typed and validated before any model loads;
unknown keys are errors that name the closest valid key.

A YAML file has three sections, `model`, `custom` and `training`, and may `extends:` other files
(a path or a list, relative to the including file; lists are replaced, mappings merged).
`python -m src.sft --config x.yaml --base_config base.yaml` merges `x.yaml` over `base.yaml`.
"""


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _rows(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in META_FIELDS:
            continue
        key = f"{prefix}.{f.name}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            section = tp if dataclasses.is_dataclass(tp) else inner[0]
            rows.append(f"| `{key}` | section{' or null' if inner else ''} | {'null' if inner else '-'} | {_cell(f.metadata.get('help', ''))} |")
            rows += _rows(section, key)
            continue
        if f.name == "args":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = "null" if default is None else (list(default) if isinstance(default, tuple) else default)
        rows.append(f"| `{key}` | {_cell(_type_name(tp))} | `{_cell(shown)}` | {_cell(f.metadata.get('help', ''))} |")
    return rows


def render() -> str:
    out = [HEADER]
    for section, cls in (("model", Config.__dataclass_fields__["model"].default_factory),  # type: ignore[attr-defined]
                         ("custom", Config.__dataclass_fields__["custom"].default_factory)):  # type: ignore[attr-defined]
        out += [f"\n## `{section}`\n", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += _rows(cls, section)
    out += ["\n## `training`\n",
            "Any `transformers.TrainingArguments` field (name and basic type checked here; values validated by "
            "TrainingArguments itself), plus our own keys:\n", "| key | type | default | meaning |", "|---|---|---|---|"]
    out += _rows(TrainingConfig, "training")
    out += ["\nDefaults this project sets for TrainingArguments fields (everything else: transformers' defaults):\n",
            "| key | default |", "|---|---|"]
    out += [f"| `training.{k}` | `{v}` |" for k, v in TRAINING_DEFAULTS.items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
