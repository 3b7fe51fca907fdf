"""Session-scoped fixtures: the real-vocabulary Qwen tokenizer (built offline once, ~4 s), and the gate of
the vLLM tests."""

from __future__ import annotations

import importlib.util
import os

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


@pytest.fixture(scope="session")
def vllm_installed() -> None:
    """The vLLM tests need the ``vllm`` package (the CPU route in the README). CI installs it and sets
    ``RMSFT_REQUIRE_VLLM=1``, which turns its absence into a failure: there they always run."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("RMSFT_REQUIRE_VLLM") == "1":
            pytest.fail("vllm is not installed, and RMSFT_REQUIRE_VLLM=1 says the vLLM tests must run (install the CPU route, README)")
        pytest.skip("vllm is not installed (the CPU route in the README installs it; CI runs these tests)")
