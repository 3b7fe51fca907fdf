"""Rollout-matching SFT for Qwen-VL detection models.

Pure logic (coords, serialisation, parsing, matching, targets, losses) lives in small modules
that never import transformers; the trainers are thin glue over them.
"""

__version__ = "0.1.0"
