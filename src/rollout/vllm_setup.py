"""What vLLM needs before it starts in this process, set by :mod:`src.rollout.vllm` (nothing for the user).

* ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core runs in the training process (colocated), so the
  weight push hands it tensors directly and the repeat guard's token table is shared.
* Without torchvision (CPU machines: only CUDA builds of it exist for this torch), transformers' Qwen2-VL
  image-processor module cannot be imported, yet vLLM's Qwen-VL model files import it (for
  ``smart_resize`` and a type). :func:`install_torchvision_shim` registers that module as an alias of the
  PIL processor module. vLLM also imports the model files in a separate "model inspection" subprocess
  (``python -m vllm.model_executor.models.registry``); :func:`route_inspection_subprocess` points vLLM's
  documented command hook (``registry._SUBPROCESS_COMMAND``) at this module, which installs the shim there
  first. No environment variable, ``PYTHONPATH`` or ``sitecustomize`` is involved.
* vLLM builds its Hugging Face processor through each model's ``ProcessingInfo.get_hf_processor``; that
  would construct the stock ``Qwen*VLProcessor``, which needs a video processor (torchvision) and picks
  transformers' default (torchvision when present) image processor. :func:`use_image_only_processors`
  makes vLLM use our image-only processors (:mod:`src.models.processor`) instead, with a stand-in video
  side that only answers vLLM's questions about video settings (videos stay disabled): vLLM then resizes
  and normalises images with exactly the processor the trainer uses, on every machine.

Run as a script (``python -m src.rollout.vllm_setup``) this module is vLLM's inspection subprocess.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

QWEN2_VL_IMAGE_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
ROOT = Path(__file__).resolve().parents[2]  # the directory holding the ``src`` package


def set_environment() -> None:
    """Environment vLLM reads when it starts: the engine core in this process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def install_torchvision_shim() -> bool:
    """Without torchvision, serve transformers' Qwen2-VL image-processor module from the PIL one.
    Returns True when the alias was installed."""
    if importlib.util.find_spec("torchvision") is not None or QWEN2_VL_IMAGE_MODULE in sys.modules:
        return False
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    alias = types.ModuleType(QWEN2_VL_IMAGE_MODULE)
    alias.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
    alias.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
    sys.modules[QWEN2_VL_IMAGE_MODULE] = alias
    return True


def route_inspection_subprocess() -> None:
    """Make vLLM's model-inspection subprocess run through this module (shim first, then vLLM's own
    entry point)."""
    import vllm.model_executor.models.registry as registry

    registry._SUBPROCESS_COMMAND = [sys.executable, "-c",
                                    f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                                    "from src.rollout import vllm_setup; vllm_setup.inspection_main()"]


def inspection_main() -> None:
    """The inspection subprocess: install the shim, then run vLLM's registry entry point."""
    import runpy

    install_torchvision_shim()
    runpy.run_module("vllm.model_executor.models.registry", run_name="__main__")


class NoVideoProcessor:
    """Stands in for a video processor vLLM never calls (videos are disabled in the engine): it answers
    vLLM's start-up questions (valid kwargs, sizes for its token budget) from the image processor."""

    fps, min_frames, max_frames = 2.0, 4, 768

    def __init__(self, image_processor):
        from transformers.processing_utils import VideosKwargs

        self.valid_kwargs = VideosKwargs
        self.size = dict(image_processor.size)
        self.patch_size = image_processor.patch_size
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.merge_size = image_processor.merge_size

    def __call__(self, *args, **kwargs):
        raise RuntimeError("the rollout engine takes images only (videos are disabled)")


def _engine_side(cls: type) -> type:
    """``cls`` (one of our image-only processors) with the stand-in video side vLLM expects.

    The ``__init__`` signature names the sub-processors: transformers derives the processor's parts from it."""

    class EngineSide(cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)
            self.video_processor = NoVideoProcessor(self.image_processor)

    EngineSide.__name__ = EngineSide.__qualname__ = cls.__name__
    return EngineSide


def use_image_only_processors() -> None:
    """vLLM's Qwen2-VL / Qwen2.5-VL / Qwen3-VL (and Qwen3-VL-MoE) build our image-only processors."""
    from vllm.model_executor.models import qwen2_5_vl, qwen2_vl, qwen3_vl

    from src.models.processor import PROCESSOR_CLASSES

    infos = {"qwen2_vl": qwen2_vl.Qwen2VLProcessingInfo, "qwen2_5_vl": qwen2_5_vl.Qwen2_5_VLProcessingInfo,
             "qwen3_vl": qwen3_vl.Qwen3VLProcessingInfo}
    for family, info in infos.items():
        engine_side = _engine_side(PROCESSOR_CLASSES[family])
        info.get_hf_processor = lambda self, _cls=engine_side, **kw: self.ctx.get_hf_processor(_cls, **kw)


class _ExpectedPushGaps(logging.Filter):
    """Drops vLLM's "<layer>: Failed to load weights" warnings that every weight push raises for layers no
    checkpoint feeds: rotary embeddings (only a derived cos/sin table) and an output head tied to the input
    embedding (its weight IS the embedding's; the engine re-derives its kernel after the push). A weight
    the model really lacks is still reported by vLLM's "weights were not loaded" warning."""

    EXPECTED = ("RotaryEmbedding", "MRotaryEmbedding", "ParallelLMHead")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.args and record.args[0] in self.EXPECTED and "Failed to load weights" in str(record.msg))


class _ThreadCallsDuringStart(logging.Filter):
    """Drops vLLM's CPU-worker warning "doesn't allow to use `torch.set_num_threads` ... skip it": vLLM's
    own start-up calls hit the no-op it installs; the engine restores torch's thread setting afterwards."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in str(record.msg)


def quiet_expected_warnings() -> None:
    """Filters for the warnings above (each added once)."""
    for name, cls in (("vllm.model_executor.model_loader.reload.layerwise", _ExpectedPushGaps),
                      ("vllm.v1.worker.cpu_worker", _ThreadCallsDuringStart)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


def prepare() -> None:
    """Everything above, in order; idempotent. Imports vLLM."""
    set_environment()
    install_torchvision_shim()
    route_inspection_subprocess()
    use_image_only_processors()
    quiet_expected_warnings()
