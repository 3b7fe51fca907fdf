"""Everything that turns prompts into rollouts: the engine interface (:mod:`src.rollout.engine`), the
engines (:mod:`src.rollout.hf`), the repeat-guard glue (:mod:`src.rollout.guard`) and the prompt / image
encoding shared by the engines, the trainers and the tools (:mod:`src.rollout.encoding`)."""
