"""Image-only Qwen-VL processors, family detection, and the one prompt encoder.

transformers 5.24's ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` refuse to
construct without a video processor, and the video processors need torchvision. The subclasses here
take only ``image_processor`` + ``tokenizer`` and always use the PIL image processor
``Qwen2VLImageProcessorPil`` (also Qwen3-VL's, with patch size 16), so resizing is identical on
machines with and without torchvision. They round-trip ``save_pretrained`` / ``from_pretrained``
(load with the subclass, or with :func:`load_processor`, which picks it from the saved files).

:func:`encode_prompts` builds a left-padded batch with ``mm_token_type_ids`` padded like ``input_ids``
(Qwen-VL needs it for correct 3-D rope positions under left padding), through the same per-sample
encoding the rollouts and collators use (``src.rollout.encoding``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


class _ImageOnlyProcessor:
    """Mixin: no video processor; the PIL image processor whatever the saved ``image_processor_type``."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            chat_template=chat_template, **kwargs,
        )

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # Hook of ProcessorMixin.from_pretrained that builds the sub-processors. The stock version asks
        # AutoImageProcessor, which prefers the torchvision backend when it is installed.
        kwargs.pop("subfolder", None)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]


class Qwen2VLImageOnlyProcessor(_ImageOnlyProcessor, Qwen2VLProcessor):
    """Qwen2-VL processor without video support."""


class Qwen2_5_VLImageOnlyProcessor(_ImageOnlyProcessor, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without video support."""


class Qwen3VLImageOnlyProcessor(_ImageOnlyProcessor, Qwen3VLProcessor):
    """Qwen3-VL processor without video support (patch size 16 lives in the image processor config)."""


# config.json ``model_type`` -> processor class. qwen3_vl_moe shares Qwen3-VL's processor.
PROCESSOR_CLASSES = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
    "qwen3_vl_moe": Qwen3VLImageOnlyProcessor,
}
# ``processor_class`` written by stock or our processors -> model_type (fallback when config.json is absent).
_PROCESSOR_CLASS_TO_FAMILY = {
    "Qwen2VLProcessor": "qwen2_vl",
    "Qwen2_5_VLProcessor": "qwen2_5_vl",
    "Qwen3VLProcessor": "qwen3_vl",
    **{cls.__name__: family for family, cls in PROCESSOR_CLASSES.items()},
}


def detect_family(model_dir: str | Path) -> str:
    """The Qwen-VL family of a model or processor directory: a key of :data:`PROCESSOR_CLASSES`.

    Reads ``config.json`` ``model_type``; without a config.json, the ``processor_class`` in
    ``processor_config.json`` / ``preprocessor_config.json``. Raises ``ValueError`` naming the dir.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"{d}: not a directory")
    config = d / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type in PROCESSOR_CLASSES:
            return model_type
        raise ValueError(
            f"{config}: model_type {model_type!r} is not a Qwen-VL model (expected one of {sorted(PROCESSOR_CLASSES)})"
        )
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = d / name
        if f.is_file():
            processor_class = json.loads(f.read_text()).get("processor_class")
            if processor_class in _PROCESSOR_CLASS_TO_FAMILY:
                return _PROCESSOR_CLASS_TO_FAMILY[processor_class]
    raise ValueError(f"{d}: no config.json or Qwen-VL processor config; cannot tell the model family")


def set_pixel_limits(processor, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Override the image processor's resize range in place (pixels of the resized image)."""
    if min_pixels is None and max_pixels is None:
        return
    old = processor.image_processor
    config = old.to_dict()
    config.pop("image_processor_type", None)
    size = dict(config.pop("size"))
    size["shortest_edge"] = min_pixels if min_pixels is not None else size["shortest_edge"]
    size["longest_edge"] = max_pixels if max_pixels is not None else size["longest_edge"]
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"min_pixels ({size['shortest_edge']}) > max_pixels ({size['longest_edge']})")
    processor.image_processor = Qwen2VLImageProcessorPil(size=size, **config)


def load_processor(model_dir: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None):
    """Load the image-only processor of a Qwen2/2.5/3-VL model dir (ours or a real checkpoint).

    Sets ``tokenizer.padding_side = "left"`` (not saved by ``save_pretrained``) and applies the optional
    ``min_pixels`` / ``max_pixels`` overrides.
    """
    processor = PROCESSOR_CLASSES[detect_family(model_dir)].from_pretrained(str(model_dir))
    set_pixel_limits(processor, min_pixels, max_pixels)
    processor.tokenizer.padding_side = "left"
    return processor


def num_image_tokens(processor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Image placeholder tokens per image after the spatial merge. ``[N, 3] -> [N]``."""
    return image_grid_thw.prod(-1) // processor.image_processor.merge_size**2
