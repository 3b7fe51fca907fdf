"""Start-up that data-parallel and sharded training need on a machine without GPUs (called by the launcher).

On GPUs transformers and accelerate set everything up from ``TrainingArguments``; nothing here changes
that: every function below acts only when several processes run and torch sees no accelerator.

* DDP: accelerate leaves such a run undistributed unless ``use_cpu`` is set (``src.sft.training_arguments``).
* DeepSpeed ZeRO (``training.deepspeed``): the ``use_cpu`` path starts ``torch.distributed`` but never
  DeepSpeed's own communication layer, so ``deepspeed.zero.Init`` (ZeRO-3, inside ``from_pretrained``)
  sees a world of one process and stops ("train_batch_size is not equal to micro_batch_per_gpu *
  gradient_acc_step * world_size"). :func:`start_deepspeed_comm` starts it over gloo before the model loads.
* FSDP (``training.fsdp``): accelerate 1.15 turns an FSDP plugin into ``DistributedType.FSDP`` only for
  GPU-like backends; for ``MULTI_CPU`` it drops the plugin and the model is silently wrapped in DDP.
  :func:`fsdp_on_cpu` is the ONE place that corrects accelerate's state for that case (FSDP2 only; FSDP1
  cannot run on CPU: "no available devices found"). ``tests/test_sharded.py`` fails once accelerate
  stops needing it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (1 process when absent): usable before
    ``torch.distributed`` starts."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def world() -> tuple[int, int]:
    """(rank, world_size) of the started process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, XPU, MPS, ...)."""
    import torch

    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def cpu_processes() -> bool:
    """Several processes and no accelerator: the case this module handles."""
    return dist_env()[2] > 1 and not has_accelerator()


def start_deepspeed_comm(args) -> bool:
    """Start DeepSpeed's communication over the run's process group when ``args`` (TrainingArguments)
    name a DeepSpeed config and several CPU processes run; call it after building ``args`` (which starts
    ``torch.distributed``) and before the model loads. Returns whether it started it."""
    if not args.deepspeed or not cpu_processes():
        return False
    import deepspeed

    deepspeed.init_distributed(dist_backend=args.ddp_backend or "gloo", auto_mpi_discovery=False)
    return True


def wants_fsdp_on_cpu(args) -> bool:
    """``args`` (TrainingArguments) ask for FSDP and several CPU processes run."""
    return getattr(args, "fsdp_plugin_args", None) is not None and cpu_processes()


@contextlib.contextmanager
def fsdp_on_cpu(args) -> Iterator[None]:
    """While the Trainer builds its Accelerator: make accelerate's state FSDP when ``args`` ask for FSDP2
    and several CPU processes run (otherwise a no-op).

    accelerate's ``AcceleratorState.__init__`` takes the FSDP plugin only for GPU-like distributed types;
    for ``MULTI_CPU`` it ignores it. The wrapper below applies, after the stock ``__init__``, what that
    ``__init__`` does for GPUs: ``distributed_type = FSDP`` and ``fsdp_plugin = plugin`` (in the shared
    state of ``AcceleratorState`` and ``PartialState``). It is restored on exit."""
    if not wants_fsdp_on_cpu(args):
        yield
        return
    if args.fsdp_plugin_args.get("fsdp_version", 1) != 2:
        from src.config.loader import ConfigError

        raise ConfigError("training.fsdp_config: FSDP1 cannot run on CPU processes (torch finds no device for it); "
                          "set training.fsdp_config.version: 2")
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    stock_init = AcceleratorState.__init__

    def init(self, *a, fsdp_plugin=None, **kw):
        shared = AcceleratorState._shared_state
        fresh = not shared or shared == PartialState._shared_state  # accelerate's own "not initialized"
        stock_init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
        if fresh and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = stock_init
