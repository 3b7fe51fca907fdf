"""Image-only Qwen-VL processors and family detection.

transformers 5.24's ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` refuse to
construct without a video processor, and the video processors need torchvision. The subclasses here
take only ``image_processor`` + ``tokenizer`` and always use the PIL image processor
``Qwen2VLImageProcessorPil`` (also Qwen3-VL's, with patch size 16), so resizing is identical on
machines with and without torchvision.

The subclasses are an internal detail of how WE load a model: what they save names stock transformers
classes only, exactly like a Hub checkpoint of the family (``processor_class: Qwen3VLProcessor``,
``image_processor_type: Qwen2VLImageProcessor``, a ``video_processor`` section with
``video_processor_type: Qwen3VLVideoProcessor``), so ``AutoProcessor``, vLLM and serving stacks read our
directories as normal Qwen-VL checkpoints. :func:`load_processor` picks the subclass from the model
family (config.json ``model_type``), never from a saved class name.

The prompt encoder (``encode_prompts``: a left-padded batch with ``mm_token_type_ids``) lives in
:mod:`src.rollout.encoding`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from src.models.checkpoints import adapter_base_dir, is_adapter_dir

# Sub-processor settings that a video processor shares with the image processor (the vision encoder's).
_VIDEO_KEYS_FROM_IMAGE = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")


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

    # What a stock processor of the family writes (set by each subclass).
    stock_processor_class: str
    stock_video_processor_type: str

    def to_dict(self) -> dict:
        """The ``processor_config.json`` content a stock processor of the family writes: stock
        ``processor_class`` and a ``video_processor`` section (its type plus the patch / merge / mean /
        std it shares with the image processor; the stock class fills frame sampling and size with its
        own defaults when it is built where torchvision exists)."""
        output = super().to_dict()
        output["processor_class"] = self.stock_processor_class
        image = output.get("image_processor", {})
        output["video_processor"] = {
            "video_processor_type": self.stock_video_processor_type,
            **{k: image[k] for k in _VIDEO_KEYS_FROM_IMAGE if k in image},
        }
        return output

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save like ``ProcessorMixin.save_pretrained``, then name the stock processor in
        ``tokenizer_config.json`` too (ProcessorMixin stamps the tokenizer with ``type(self).__name__``)."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        self.tokenizer._set_processor_class(self.stock_processor_class)
        tokenizer_config = Path(save_directory) / "tokenizer_config.json"
        if tokenizer_config.is_file():
            data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            data["processor_class"] = self.stock_processor_class
            tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return files


class Qwen2VLImageOnlyProcessor(_ImageOnlyProcessor, Qwen2VLProcessor):
    """Qwen2-VL processor without video support; saves as ``Qwen2VLProcessor``."""

    stock_processor_class = Qwen2VLProcessor.__name__
    stock_video_processor_type = "Qwen2VLVideoProcessor"


class Qwen2_5_VLImageOnlyProcessor(_ImageOnlyProcessor, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without video support; saves as ``Qwen2_5_VLProcessor``."""

    stock_processor_class = Qwen2_5_VLProcessor.__name__
    stock_video_processor_type = "Qwen2VLVideoProcessor"  # Qwen2.5-VL reuses Qwen2-VL's video processor


class Qwen3VLImageOnlyProcessor(_ImageOnlyProcessor, Qwen3VLProcessor):
    """Qwen3-VL processor without video support (patch size 16 lives in the image processor config);
    saves as ``Qwen3VLProcessor``."""

    stock_processor_class = Qwen3VLProcessor.__name__
    stock_video_processor_type = "Qwen3VLVideoProcessor"


# config.json ``model_type`` -> processor class. qwen3_vl_moe shares Qwen3-VL's processor.
PROCESSOR_CLASSES = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
    "qwen3_vl_moe": Qwen3VLImageOnlyProcessor,
}


def detect_family(model_dir: str | Path) -> str:
    """The Qwen-VL family of a model directory: a key of :data:`PROCESSOR_CLASSES`.

    Always the ``model_type`` of a ``config.json``: the directory's own, or for a LoRA adapter directory
    (``adapter_config.json``, no ``config.json``) that of the base model named in its
    ``base_model_name_or_path``. Never a saved processor class name (the processor is the same for a
    dense and a MoE Qwen3-VL). Raises ``ValueError`` naming the directory or file.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"{d}: not a directory")
    if is_adapter_dir(d):
        return detect_family(adapter_base_dir(d))
    config = d / "config.json"
    if not config.is_file():
        raise ValueError(f"{d}: no config.json (nor adapter_config.json); cannot tell the model family")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type in PROCESSOR_CLASSES:
        return model_type
    raise ValueError(
        f"{config}: model_type {model_type!r} is not a Qwen-VL model (expected one of {sorted(PROCESSOR_CLASSES)})"
    )


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
