"""Session-scoped fixtures: the real-vocabulary Qwen tokenizer (built offline once, ~4 s), and the gate of
the vLLM tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

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
def shapes_dir(tmp_path_factory) -> Path:
    """8 train / 4 val shapes images (64 px, 1-2 rectangles or triangles) of the in-process trainer tests."""
    from src.data.make_shapes import make_shapes

    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num_train=8, num_val=4, seed=0, image_size=64, min_shapes=1, max_shapes=2, kinds=("rectangle", "triangle"))
    return out


@pytest.fixture(scope="session")
def vllm_installed() -> None:
    """The vLLM tests need the ``vllm`` package (the CPU route in the README). CI installs it and sets
    ``RMSFT_REQUIRE_VLLM=1``, which turns its absence into a failure: there they always run."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("RMSFT_REQUIRE_VLLM") == "1":
            pytest.fail("vllm is not installed, and RMSFT_REQUIRE_VLLM=1 says the vLLM tests must run (install the CPU route, README)")
        pytest.skip("vllm is not installed (the CPU route in the README installs it; CI runs these tests)")


@pytest.fixture(scope="session")
def ddp_assets(tmp_path_factory, tiny_model_dirs):
    """The tiny Qwen3-VL and 16 shapes images (64 px) of the torchrun tests (test_distributed, test_sharded)."""
    from src.data.make_shapes import make_shapes

    root = tmp_path_factory.mktemp("ddp")
    make_shapes(root / "shapes", num_train=16, num_val=4, seed=1, image_size=64, min_shapes=1, max_shapes=2, kinds=("rectangle", "triangle"))
    return {"root": root, "model": tiny_model_dirs["qwen3_vl"]}


@pytest.fixture(scope="session")
def one_process_runs(ddp_assets):
    """``(variant, normalization) -> (run dir, stdout)``: 3 steps of 1 process x 4 samples, the reference of
    the 2-rank runs, trained once per session whichever test asks first."""
    from tests.test_distributed import train

    done: dict = {}

    def get(variant: str, normalization: str = "sample"):
        if (variant, normalization) not in done:
            done[variant, normalization] = train(ddp_assets, f"{variant}_{normalization}_1x4", variant, per_device=4, nproc=1,
                                                 normalization=normalization)
        return done[variant, normalization]

    return get
