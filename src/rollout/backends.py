"""Pick and build the rollout engine named by ``custom.extra.rollout_matching.backend``: ``hf``
(:mod:`src.rollout.hf`) or ``vllm`` (:mod:`src.rollout.vllm`). Kept apart from the interface
(:mod:`src.rollout.engine`), which the engines themselves import."""

from __future__ import annotations

from src.rollout.engine import DecodeSettings, RolloutEngine


def build_engine(rm, table, pad_id: int, *, processor=None, seed: int = 0,
                 gradient_checkpointing_kwargs: dict | None = None) -> RolloutEngine:
    """The engine named by ``rm.backend`` (a :class:`src.config.schema.RolloutMatchingConfig`) with its
    decoding and repeat guard. ``table``: the tokenizer's :class:`src.rollout_matching.tokens.TokenTable`;
    ``processor`` (the model's processor) and ``seed`` (the run's seed) are what the vLLM engine needs.
    Settings that depend on the machine are checked here (:class:`src.config.loader.ConfigError`); the
    vLLM engine itself starts at its first rollout."""
    from src.rollout_matching.repeat_guard import GuardSettings

    guard = GuardSettings.from_config(rm.repeat_guard) if rm.repeat_guard.enabled else None
    settings = DecodeSettings.from_config(rm)
    if rm.backend == "hf":
        from src.rollout.hf import HFEngine

        return HFEngine(settings, eos_id=table.im_end_id, pad_id=pad_id, table=table, guard=guard,
                        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    if rm.backend == "vllm":
        from src.rollout.vllm import EngineOptions, VLLMEngine, check_machine

        options = EngineOptions.from_config(rm.vllm, seed=seed)
        check_machine(options)
        return VLLMEngine(settings, options, table.im_end_id, pad_id, table=table, processor=processor, guard=guard)
    raise ValueError(f"custom.extra.rollout_matching.backend: unknown engine {rm.backend!r}")
