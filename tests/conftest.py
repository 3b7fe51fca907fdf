"""Session-scoped fixtures: the real-vocabulary Qwen tokenizer (built offline once, ~4 s)."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures_models"]


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from src.models.tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer()


@pytest.fixture(scope="session")
def token_table(qwen_tokenizer):
    from src.rollout_matching.tokens import token_table as build

    return build(qwen_tokenizer)
