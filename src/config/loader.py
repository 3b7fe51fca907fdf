"""Load YAML configs: ``extends:`` chains, recursive merge, strict typed validation.

* ``extends:`` is a path or a list of paths, relative to the file that names them; later entries and
  the including file override earlier ones. Cycles are rejected.
* Merge is recursive for mappings; lists and scalars are replaced.
* ``--base_config`` is merged under ``--config``.
* Every key is checked: an unknown key, a wrong type or an impossible combination raises
  :class:`ConfigError` with ONE line naming the key (and the closest valid key). Nothing loads a model.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence

import yaml

from src.config.schema import META_FIELDS, TRAINING_DEFAULTS, Config, RolloutMatchingConfig, TrainingConfig


class ConfigError(ValueError):
    """A config problem; ``str(e)`` is one line naming the key."""


# ------------------------------------------------------------------------------------ YAML + merge


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def merge(base: Mapping, over: Mapping) -> dict:
    """Recursive merge: mappings merge key by key, anything else in ``over`` replaces ``base``."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_tree(path: str | Path, _stack: tuple[Path, ...] = ()) -> tuple[dict, list[Path]]:
    """Read ``path`` and everything it ``extends:``; return (merged dict, files in merge order)."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"{path}: extends: cycle ({chain})")
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise ConfigError(f"{path}: extends: must be a path or a list of paths")
    merged: dict = {}
    files: list[Path] = []
    for parent in parents:
        pdata, pfiles = load_yaml_tree(path.parent / parent, (*_stack, path))
        merged = merge(merged, pdata)
        files += pfiles
    return merge(merged, data), [*files, path]


# ------------------------------------------------------------------------------- typed validation


def _closest(key: str, valid: typing.Iterable[str]) -> str:
    m = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{m[0]}'?)" if m else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the typed value or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = _closest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{key}: must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}")
        return value
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return build_section(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in schema.py


def build_section(cls: type, data: Mapping, prefix: str) -> Any:
    """Build the frozen dataclass ``cls`` from ``data``; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in META_FIELDS}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key}: unknown key{_closest(str(k), names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _training_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments  # noqa: PLC0415 - heavy import, only when validating

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def _check_training_value(key: str, value: Any, f: dataclasses.Field) -> None:
    tp = f.type if not isinstance(f.type, str) else f.type.replace(" ", "")
    simple = {"bool": bool, "int": int, "float": float, "str": str, "bool|None": bool, "int|None": int, "float|None": float, "str|None": str}
    tp = simple.get(tp, tp) if isinstance(tp, str) else tp
    if value is None or tp not in (bool, int, float, str):
        return  # complex union / enum fields: TrainingArguments validates them itself
    try:
        _coerce(value, tp, key)
    except ConfigError as e:
        raise ConfigError(str(e)) from None


def build_training(data: Mapping) -> TrainingConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"training: expected a mapping (section), got {data!r}")
    fields = _training_fields()
    ours = {f.name for f in dataclasses.fields(TrainingConfig) if f.name != "args"}
    args = dict(TRAINING_DEFAULTS)
    own: dict[str, Any] = {}
    hints = typing.get_type_hints(TrainingConfig)
    for k, v in data.items():
        key = f"training.{k}"
        if k in ours:
            own[k] = _coerce(v, hints[k], key)
        elif k == "args":
            raise ConfigError("training.args: put TrainingArguments fields directly under training:")
        elif k in fields:
            _check_training_value(key, v, fields[k])
            args[k] = v
        else:
            raise ConfigError(f"{key}: unknown key (not a transformers.TrainingArguments field){_closest(str(k), [*fields, *ours])}")
    return TrainingConfig(**own, args=MappingProxyType(args))


# ------------------------------------------------------------------------------ cross-key checks


def check_combinations(cfg: Config) -> None:
    """Impossible combinations, each named by its key."""
    rm = cfg.rollout_matching
    t = cfg.training
    args = t.args
    if not cfg.model.model_name_or_path:
        raise ConfigError("model.model_name_or_path: required (a local model directory)")
    if t.packing:
        if cfg.custom.trainer_variant == "rollout_matching_sft":
            raise ConfigError("training.packing: true is not supported with custom.trainer_variant: rollout_matching_sft (each rollout needs its own unpacked sequence); set training.packing: false")
        raise ConfigError("training.packing: true is not supported (batches are padded per sample); set training.packing: false")
    resume = args.get("resume_from_checkpoint")
    if resume is not None and not isinstance(resume, (bool, str)):
        raise ConfigError(f"training.resume_from_checkpoint: a checkpoint directory, or true for the newest complete checkpoint of output_dir; got {resume!r}")
    if resume not in (None, False) and t.overwrite_output_dir:
        raise ConfigError("training.overwrite_output_dir: true deletes the checkpoints that training.resume_from_checkpoint would continue from; set only one of them")
    if args.get("remove_unused_columns") is not False:
        raise ConfigError("training.remove_unused_columns: must be false (the collators and the rollout need the raw records)")
    if not cfg.custom.train_jsonl:
        raise ConfigError("custom.train_jsonl: required (path to the training JSONL)")
    if rm.decode_mode == "greedy" and (rm.temperature != 0.0 or rm.num_beams != 1):
        raise ConfigError("custom.extra.rollout_matching.decode_mode: greedy needs temperature: 0.0 and num_beams: 1")
    if rm.decode_mode == "beam" and (rm.num_beams < 2 or rm.temperature != 0.0):
        raise ConfigError("custom.extra.rollout_matching.num_beams: decode_mode: beam needs num_beams >= 2 and temperature: 0.0")
    if rm.decode_mode == "sample" and (rm.temperature <= 0.0 or rm.num_beams != 1):
        raise ConfigError("custom.extra.rollout_matching.temperature: decode_mode: sample needs temperature > 0 and num_beams: 1")
    positive_ints = {
        "max_new_tokens": rm.max_new_tokens, "decode_batch_size": rm.decode_batch_size, "candidate_top_k": rm.candidate_top_k,
        "ot_iters": rm.ot_iters, "num_beams": rm.num_beams,
    }
    for k, v in positive_ints.items():
        if v < 1:
            raise ConfigError(f"custom.extra.rollout_matching.{k}: must be >= 1, got {v}")
    if not 0.0 <= rm.maskiou_gate <= 1.0:
        raise ConfigError(f"custom.extra.rollout_matching.maskiou_gate: must be in [0, 1], got {rm.maskiou_gate}")
    if rm.maskiou_resolution < 16:
        raise ConfigError(f"custom.extra.rollout_matching.maskiou_resolution: must be >= 16, got {rm.maskiou_resolution}")
    for k in ("fp_cost", "fn_cost", "ot_epsilon"):
        if getattr(rm, k) <= 0:
            raise ConfigError(f"custom.extra.rollout_matching.{k}: must be > 0, got {getattr(rm, k)}")
    if not 0.0 < rm.top_p <= 1.0:
        raise ConfigError(f"custom.extra.rollout_matching.top_p: must be in (0, 1], got {rm.top_p}")
    if rm.top_k < 0 or rm.repetition_penalty <= 0:
        raise ConfigError("custom.extra.rollout_matching.top_k: must be >= 0 (and repetition_penalty > 0)")
    if rm.loss_normalization == "token" and rm.rollout_window != "optimizer_step":
        raise ConfigError("custom.extra.rollout_matching.loss_normalization: token needs rollout_window: optimizer_step "
                          "(the step's supervised tokens are counted before its first backward)")
    for k in ("ce_weight", "coord_weight"):
        if getattr(rm, k) < 0:
            raise ConfigError(f"custom.extra.rollout_matching.{k}: must be >= 0")
    check_vllm(rm)
    g = rm.repeat_guard
    if g.enabled and rm.decode_mode == "beam":
        raise ConfigError("custom.extra.rollout_matching.repeat_guard.enabled: not available with decode_mode: beam (beams are reordered every step); use greedy or sample")
    if (g.ngram_size < 1 or g.ngram_max_repeats < 2 or g.max_duplicate_objects < 1 or g.max_consecutive_duplicates < 1
            or (g.max_objects is not None and g.max_objects < 1)):
        raise ConfigError("custom.extra.rollout_matching.repeat_guard: ngram_size >= 1, ngram_max_repeats >= 2, max_duplicate_objects >= 1, "
                          "max_consecutive_duplicates >= 1, max_objects >= 1 or null")
    c = cfg.custom.coord_soft_ce_w1
    if c.target_sigma <= 0 or c.temperature <= 0:
        raise ConfigError("custom.coord_soft_ce_w1.target_sigma: target_sigma and temperature must be > 0")
    if c.target_truncate is not None and c.target_truncate < 0:
        raise ConfigError("custom.coord_soft_ce_w1.target_truncate: must be >= 0 or null")
    for k in ("soft_ce_weight", "w1_weight", "gate_weight"):
        if getattr(c, k) < 0:
            raise ConfigError(f"custom.coord_soft_ce_w1.{k}: must be >= 0")
    ebs = t.effective_batch_size
    if ebs is not None:
        if ebs < 1:
            raise ConfigError(f"training.effective_batch_size: must be >= 1, got {ebs}")
        if "gradient_accumulation_steps" in args and args["gradient_accumulation_steps"] != 1:
            raise ConfigError("training.effective_batch_size: set either effective_batch_size or gradient_accumulation_steps, not both")
    sd = cfg.custom.shapes_data
    if sd is not None:
        kinds = {"rectangle", "triangle", "pentagon", "ellipse"}
        bad = [k for k in sd.kinds if k not in kinds]
        if bad:
            raise ConfigError(f"custom.shapes_data.kinds: unknown kind {bad[0]!r}{_closest(bad[0], kinds)}")
        if not 0 <= sd.min_shapes <= sd.max_shapes:
            raise ConfigError("custom.shapes_data.min_shapes: need 0 <= min_shapes <= max_shapes")
    if cfg.model.lora.enabled and cfg.model.lora.r < 1:
        raise ConfigError("model.lora.r: must be >= 1")


def check_vllm(rm: RolloutMatchingConfig) -> None:
    """``backend: vllm`` settings (the engine itself starts at the first rollout)."""
    v = rm.vllm
    key = "custom.extra.rollout_matching.vllm"
    if rm.backend == "vllm" and rm.decode_mode == "beam":
        raise ConfigError("custom.extra.rollout_matching.decode_mode: beam is not available with backend: vllm; use greedy or sample, or backend: hf")
    if not 0.0 < v.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"{key}.gpu_memory_utilization: must be in (0, 1], got {v.gpu_memory_utilization}")
    if v.kv_cache_gb is not None and v.kv_cache_gb <= 0:
        raise ConfigError(f"{key}.kv_cache_gb: must be > 0 or null, got {v.kv_cache_gb}")
    if v.tensor_parallel_size < 1:
        raise ConfigError(f"{key}.tensor_parallel_size: must be >= 1, got {v.tensor_parallel_size}")
    if v.max_model_len is not None and v.max_model_len <= rm.max_new_tokens:
        raise ConfigError(f"{key}.max_model_len: {v.max_model_len} leaves no room for a prompt with max_new_tokens {rm.max_new_tokens}; raise it or set null")


def gradient_accumulation_for(cfg: Config, world_size: int) -> int:
    """gradient_accumulation_steps implied by ``training.effective_batch_size`` (or the explicit one)."""
    args = cfg.training.args
    ebs = cfg.training.effective_batch_size
    if ebs is None:
        return int(args.get("gradient_accumulation_steps", 1))
    per_step = int(args.get("per_device_train_batch_size", 1)) * world_size
    if ebs % per_step:
        raise ConfigError(
            f"training.effective_batch_size: {ebs} is not a multiple of per_device_train_batch_size x world_size = {per_step}"
        )
    return ebs // per_step


# ------------------------------------------------------------------------------------ entry point


def config_from_dict(data: Mapping, sources: tuple[str, ...] = (), overrides: tuple[str, ...] = ()) -> Config:
    """Validate a merged config mapping into a :class:`Config` (raises :class:`ConfigError`)."""
    data = dict(data)
    top = {"model", "custom", "training"}
    for k in data:
        if k not in top:
            raise ConfigError(f"{k}: unknown top-level key{_closest(str(k), top)}; sections are model, custom, training")
    for k in top:
        if data.get(k) is None:
            data[k] = {}
    model = _coerce(data["model"], typing.get_type_hints(Config)["model"], "model")
    custom = _coerce(data["custom"], typing.get_type_hints(Config)["custom"], "custom")
    training = build_training(data["training"])
    cfg = Config(model=model, custom=custom, training=training, sources=sources, overrides=overrides)
    check_combinations(cfg)
    return cfg


_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (key path, value). The value is read as YAML (``true``, ``null``, ``[a, b]``,
    ``{k: v}``, numbers); a plain number YAML 1.1 reads as a string (``3e-5``) is a float. Quote a value
    to keep it a string (``training.output_dir='"1e3"'``)."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not key.strip() or any(not part for part in path):
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. training.learning_rate=3e-5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    if isinstance(value, str) and _FLOAT.fullmatch(raw.strip()):
        value = float(raw)
    return path, value


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """``data`` with each ``section.key=value`` of ``overrides`` merged over it, in order (later wins)."""
    merged = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        merged = merge(merged, nested)
    return merged


def load_config(config: str | Path, base_config: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load ``config`` (merged over ``base_config`` if given), resolve ``extends:``, apply the command-line
    ``overrides`` (``section.key=value``, last), validate — overrides exactly like YAML keys."""
    merged: dict = {}
    files: list[Path] = []
    if base_config is not None:
        merged, files = load_yaml_tree(base_config)
    data, cfiles = load_yaml_tree(config)
    merged = apply_overrides(merge(merged, data), overrides)
    files += cfiles
    try:
        return config_from_dict(merged, tuple(str(f) for f in files), tuple(overrides))
    except ConfigError as e:
        blamed = [o for o in overrides if str(e).startswith(o.partition("=")[0].strip())]
        where = f"command-line override {blamed[-1]}" if blamed else str(config)
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of a config (for the run directory's resolved_config.yaml)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v) if f.name not in META_FIELDS}
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    d = conv(cfg)
    d["training"] = {**{k: v for k, v in d["training"].items() if k != "args"}, **conv(cfg.training.args)}
    return d


def load_rollout_matching(path: str | Path) -> RolloutMatchingConfig:
    """Only the ``custom.extra.rollout_matching`` section of the YAML ``path`` (``extends:`` resolved).

    For tools that need just the stage-2 knobs (``python -m src.replay``): a YAML holding only that
    section works, and so does a full training config (every key outside the section is ignored). A
    missing section means all defaults. Keys inside the section are validated like :func:`load_config`
    (unknown key -> error naming the closest valid one). Stage-2 keys written at the top level, outside
    the section, are an error rather than silently ignored.
    """
    data, _ = load_yaml_tree(path)
    section_names = {f.name for f in dataclasses.fields(RolloutMatchingConfig)}
    misplaced = sorted(k for k in data if k in section_names)
    if misplaced:
        raise ConfigError(f"{path}: {misplaced[0]}: stage-2 keys belong under custom.extra.rollout_matching")
    section: Any = data
    prefix = ""
    for name in ("custom", "extra", "rollout_matching"):
        prefix = f"{prefix}.{name}" if prefix else name
        section = section.get(name)
        if section is None:
            return RolloutMatchingConfig()
        if not isinstance(section, Mapping):
            raise ConfigError(f"{path}: {prefix}: expected a mapping (section), got {section!r}")
    try:
        rm = build_section(RolloutMatchingConfig, section, prefix)
        check_vllm(rm)
        return rm
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
