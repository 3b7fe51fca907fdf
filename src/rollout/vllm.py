"""The vLLM engine (``custom.extra.rollout_matching.backend: vllm``): one colocated ``vllm.LLM`` per rank,
created once (at the first rollout), in the training process.

What it guarantees, and how:

* Token-in. Each request is the :class:`PromptEncoding`'s own prompt ids (its image-token run collapsed
  to one placeholder, which vLLM expands again by its own count) plus the PIL image it was encoded from.
  Every rollout reports what the engine really consumed: ``consumed_prompt_ids`` = the prompt ids vLLM
  returns with the output, ``consumed_image_digest`` = sha1 of the ``pixel_values`` vLLM's processor
  handed to the model (taken from the engine request). The trainer compares both with its
  teacher-forced forward (``check_prompt_alignment``) and stops on any difference.
  vLLM processes images with our image-only processor (:mod:`src.rollout.vllm_setup`), so the pixels are
  the trainer's.
* Decoding equal in meaning to :mod:`src.rollout.hf` (:func:`sampling_params`): greedy = temperature 0;
  sample = temperature / top_p / top_k (0 = off) / repetition_penalty with one seed per request drawn
  from this rank's torch RNG (restored on resume) and mixed with the rank; ``max_tokens`` =
  ``max_new_tokens``; stop at ``<|im_end|>`` (kept) or ``<|endoftext|>`` (dropped); nothing taken from the
  checkpoint's ``generation_config.json``. Beam search is refused (config validation).
* The repeat guard: a vLLM logits processor (:class:`RepeatGuardStopper`) runs the same
  :class:`RowGuard` per request and forces ``<|im_end|>`` right after the token that trips it (so the
  engine stops early); the output is then replayed through a fresh guard and cut exactly where the HF
  engine's stopping criterion would have stopped (:func:`src.rollout.engine.finish_response`), and counted the same way.
* Weights. The engine starts from a shell directory (config + processor, random weights) and receives
  the training model's weights before its first rollout and after every optimizer step that changed them
  (:meth:`VLLMEngine.mark_stale`, called by the trainer): ``reload_weights`` with
  :func:`src.rollout.weights.checkpoint_tensors` (LoRA merged, ZeRO-3 gathered one module at a time),
  then the prefix and encoder caches are reset. Float32 greedy rollouts then equal HF ``generate`` token
  for token; bfloat16 ones are close but not equal (kernel numerics).
* Process state. Building vLLM reseeds the global RNGs and, on CPU, drops torch to one thread and
  disables ``torch.set_num_threads``: both are restored after the build.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from src.rollout.encoding import NO_IMAGE_DIGEST, PromptEncoding, pixel_digest
from src.rollout.engine import DecodeSettings, Rollout, finish_response
from src.rollout.weights import checkpoint_tensors, unwrap
from src.utils.parallel import world

MAX_SEED = 2**63 - 1
GIB = 1 << 30
CPU_KV_CACHE_GB = 1.0


@dataclass(frozen=True)
class EngineOptions:
    """``custom.extra.rollout_matching.vllm`` (see :class:`src.config.schema.VLLMConfig`) + the run's seed."""

    dtype: str = "auto"
    gpu_memory_utilization: float = 0.3
    kv_cache_gb: float | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    enable_sleep_mode: bool = False
    seed: int = 0

    @classmethod
    def from_config(cls, v, seed: int = 0) -> "EngineOptions":
        return cls(**{k: getattr(v, k) for k in cls.__dataclass_fields__ if k != "seed"}, seed=seed)


# ------------------------------------------------------------------------------ requests and outputs


def collapse_image_runs(prompt: PromptEncoding) -> list[int]:
    """The prompt ids with each run of image tokens (``mm_token_type_ids == 1``) reduced to its first token:
    the form vLLM expands (one ``<|image_pad|>`` per image -> its own number of image tokens)."""
    ids, mm = prompt.input_ids.tolist(), prompt.mm_token_type_ids.tolist()
    return [t for i, t in enumerate(ids) if not (mm[i] and i > 0 and mm[i - 1])]


def request_image_digest(request) -> str:
    """Digest of the pixels a vLLM ``EngineCoreRequest`` carries to the model (one image at most)."""
    features = [f for f in (request.mm_features or ()) if f.modality == "image"]
    if not features:
        return NO_IMAGE_DIGEST
    if len(features) > 1 or features[0].data is None:
        raise RuntimeError(f"vLLM request {request.request_id}: expected one image with its pixels, got {len(features)} "
                           "(the engine disables vLLM's processor cache so that the pixels travel with the request)")
    return pixel_digest(features[0].data.get_data()["pixel_values"])


def sampling_params(s: DecodeSettings, eos_id: int, pad_id: int, seeds: Sequence[int | None], guard=None, min_tokens: int = 0) -> list:
    """One ``vllm.SamplingParams`` per request, equal in meaning to :func:`src.rollout.hf.build_generation_config`
    (``min_tokens`` > 0 only for benchmarks that force a fixed answer length)."""
    from vllm import SamplingParams

    sample = s.decode_mode == "sample"  # beam never gets here: VLLMEngine and the config refuse it
    extra = {"repeat_guard": asdict(guard)} if guard is not None else None
    return [SamplingParams(
        n=1,
        max_tokens=s.max_new_tokens,
        min_tokens=min_tokens,
        temperature=s.temperature if sample else 0.0,
        top_p=s.top_p if sample else 1.0,
        top_k=s.top_k if sample and s.top_k > 0 else 0,  # 0 = off (vLLM's "consider all tokens")
        min_p=0.0,
        repetition_penalty=s.repetition_penalty,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=seed if sample else None,
        stop_token_ids=[eos_id, pad_id],
        ignore_eos=False,
        skip_special_tokens=False,
        detokenize=False,
        extra_args=extra,
    ) for seed in seeds]


# -------------------------------------------------------------------------------------- repeat guard

_TABLES: dict[str, object] = {}  # tokenizer directory -> TokenTable (filled by the engine before vLLM starts)


def _table_for(tokenizer_dir: str):
    if tokenizer_dir not in _TABLES:  # a vLLM worker in another process: build it from the saved tokenizer
        from transformers import AutoTokenizer

        from src.rollout_matching.tokens import token_table

        _TABLES[tokenizer_dir] = token_table(AutoTokenizer.from_pretrained(tokenizer_dir))
    return _TABLES[tokenizer_dir]


class _RowStopper:
    """Per-request logits hook: feeds the request's new tokens to a :class:`RowGuard`; once it trips, only
    ``<|im_end|>`` stays possible, which ends the request at the next token."""

    def __init__(self, table, settings):
        from src.rollout_matching.repeat_guard import RowGuard

        self.guard, self.end_id, self.fed, self.tripped = RowGuard(table, settings), table.im_end_id, 0, False

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        while not self.tripped and self.fed < len(output_ids):
            self.tripped = self.guard.push(output_ids[self.fed])
            self.fed += 1
        if self.tripped:
            logits.fill_(float("-inf"))
            logits[self.end_id] = 0.0
        return logits


def _guard_stopper_class():
    """:class:`RepeatGuardStopper`, defined once vLLM is importable."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    from src.rollout_matching.repeat_guard import GuardSettings

    class RepeatGuardStopper(AdapterLogitsProcessor):
        """vLLM logits processor: the repeat guard for requests whose ``extra_args`` carry its settings."""

        def __init__(self, vllm_config, device, is_pin_memory):
            super().__init__(vllm_config, device, is_pin_memory)
            self.tokenizer_dir = vllm_config.model_config.tokenizer

        def is_argmax_invariant(self) -> bool:
            return False  # it changes the greedy choice: it must run in greedy mode too

        def new_req_logits_processor(self, params):
            settings = (params.extra_args or {}).get("repeat_guard")
            return _RowStopper(_table_for(self.tokenizer_dir), GuardSettings(**settings)) if settings else None

    return RepeatGuardStopper


# ------------------------------------------------------------------------------------ process state


@contextlib.contextmanager
def preserved_process_state() -> Iterator[None]:
    """Restore what building a vLLM engine changes in this process: the python / numpy / torch RNG states
    (vLLM seeds them) and torch's intra-op thread count (vLLM's CPU worker sets 1 and replaces
    ``torch.set_num_threads`` with a no-op)."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        torch.set_num_threads = set_threads
        set_threads(threads)


def max_prompt_tokens(processor) -> int:
    """The longest prompt :func:`src.rollout.encoding.encode_prompt` can produce with the shared prompt: its
    text tokens plus the image tokens of an image at the processor's ``max_pixels``."""
    from src.data.prompt import prompt_text

    ip = processor.image_processor
    text = len(processor.tokenizer(prompt_text(processor), add_special_tokens=False)["input_ids"])
    return text - 1 + int(ip.size["longest_edge"]) // (ip.patch_size * ip.merge_size) ** 2


def refresh_tied_heads(model) -> int:
    """Re-derive the kernel state of output heads tied to an input embedding (run inside the engine after a
    weight push). ``reload_weights`` refreshes every layer that received weights; a tied ``lm_head``
    receives none (its weight IS the embedding's), so a backend that prepacks the head's matrix at load
    (vLLM's CPU backend does) would keep computing logits with the old one. Returns the heads refreshed."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead) and id(m.weight) in embeddings]
    for head in heads:
        head.quant_method.process_weights_after_loading(head)
    return len(heads)


def write_shell(model, processor, out: Path) -> Path:
    """The engine's model directory: the training model's config and processor, no weights (vLLM starts
    with random weights; the real ones are pushed before the first rollout)."""
    unwrap(model).config.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def check_machine(options: EngineOptions) -> None:
    """What the config cannot know before it meets the machine: vLLM installed, a GPU for sleep mode, ranks
    divisible into tensor-parallel groups. Raises :class:`src.config.loader.ConfigError` (one line)."""
    import importlib.util

    from src.config.loader import ConfigError

    key = "custom.extra.rollout_matching"
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{key}.backend: vllm needs the vllm package: pip install -e '.[vllm]' on GPUs, or the CPU route in the README")
    if options.enable_sleep_mode and not torch.cuda.is_available():
        raise ConfigError(f"{key}.vllm.enable_sleep_mode: true needs a GPU (vLLM's CPU backend has no sleep mode); set it to false")
    _, world_size = world()
    if world_size % options.tensor_parallel_size:
        raise ConfigError(f"{key}.vllm.tensor_parallel_size: {options.tensor_parallel_size} does not divide the {world_size} ranks")


# ------------------------------------------------------------------------------------------ engine


class VLLMEngine:
    """See the module docstring. ``generate`` has the :class:`src.rollout.engine.RolloutEngine` signature;
    ``mark_stale`` after an optimizer step; ``close`` before the process group is destroyed."""

    holds_own_weights = True  # generation never reads the training model's (possibly sharded) parameters

    def __init__(self, settings: DecodeSettings, options: EngineOptions, eos_id: int, pad_id: int, *, table, processor, guard=None):
        if settings.decode_mode == "beam":
            raise ValueError("custom.extra.rollout_matching.decode_mode: beam is not available with backend: vllm; use greedy or sample")
        self.settings, self.options = settings, options
        self.eos_id, self.pad_id = eos_id, pad_id
        self.table, self.processor, self.guard = table, processor, guard
        self.llm = None
        self.stale = True  # the engine holds no weights of the policy yet
        self.asleep = False
        self.max_model_len: int | None = None
        self._shell: Path | None = None
        self._tp_group = None  # this rank's tensor-parallel group (tensor_parallel_size > 1)
        self.start_s = 0.0
        self.min_new_tokens = 0  # benchmarks only: force answers to a fixed length (HF: generation_config.min_new_tokens)
        self.last_stats: dict[str, float] = {}

    # ----------------------------------------------------------------------------- lifecycle

    def mark_stale(self) -> None:
        """The policy's weights changed (an optimizer step): push them before the next rollout."""
        self.stale = True

    def start(self, model) -> None:
        """Build the ``vllm.LLM`` (once) for ``model``'s architecture, dtype and processor."""
        if self.llm is not None:
            return
        from src.rollout import vllm_setup

        t0 = time.perf_counter()
        vllm_setup.prepare()
        from vllm import LLM

        o = self.options
        dtype = o.dtype if o.dtype != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
        self.max_model_len = o.max_model_len or self.settings.max_new_tokens + max_prompt_tokens(self.processor)
        self._shell = write_shell(model, self.processor, Path(tempfile.mkdtemp(prefix="rmsft_vllm_")))
        _TABLES[str(self._shell)] = self.table
        on_gpu = torch.cuda.is_available()
        kv_gb = o.kv_cache_gb if o.kv_cache_gb is not None else (None if on_gpu else CPU_KV_CACHE_GB)
        rank, world_size = world()
        kwargs = dict(
            model=str(self._shell), load_format="dummy", dtype=dtype, seed=o.seed + rank // o.tensor_parallel_size,
            max_model_len=self.max_model_len, max_num_seqs=self.settings.decode_batch_size,
            tensor_parallel_size=o.tensor_parallel_size, gpu_memory_utilization=o.gpu_memory_utilization,
            kv_cache_memory_bytes=int(kv_gb * GIB) if kv_gb is not None else None,
            enable_sleep_mode=o.enable_sleep_mode, enforce_eager=not on_gpu,
            limit_mm_per_prompt={"image": 1, "video": 0}, mm_processor_cache_gb=0,  # pixels travel with each request
            generation_config="vllm",  # nothing from the checkpoint's generation_config.json
            logits_processors=[_guard_stopper_class()],  # inert for requests without guard settings
        )
        from vllm.engine.arg_utils import EngineArgs

        if "mm_device_do_normalize" in EngineArgs.__dataclass_fields__:
            kwargs["mm_device_do_normalize"] = False  # normalise in the processor, as the trainer does (same pixels, same digest)
        if o.tensor_parallel_size > 1 or world_size > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # the engine lives in this torchrun rank
        if o.tensor_parallel_size > 1:
            import torch.distributed as dist

            tp = o.tensor_parallel_size
            self._tp_group, _ = dist.new_subgroups_by_enumeration([list(range(i, i + tp)) for i in range(0, world_size, tp)])
        with preserved_process_state():
            self.llm = LLM(**kwargs)
        self.start_s = time.perf_counter() - t0

    def close(self) -> None:
        """Shut the engine down (before the training process group is destroyed) and remove its directory."""
        if self.llm is not None:
            llm, self.llm = self.llm, None
            llm.llm_engine.engine_core.shutdown()
            del llm
        if self._shell is not None:
            _TABLES.pop(str(self._shell), None)
            shutil.rmtree(self._shell, ignore_errors=True)
            self._shell = None

    # ---------------------------------------------------------------------------------- weights

    def push_weights(self, model) -> float:
        """Load ``model``'s weights into the engine (module by module, see :mod:`src.rollout.weights`) and
        drop everything computed with the old ones (prefix KV cache, vision-encoder cache). Seconds."""
        t0 = time.perf_counter()
        self._wake()
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checkpoint_tensors(model), "is_checkpoint_format": True})
        self.llm.apply_model(refresh_tied_heads)
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()  # else the next image request misses the encoder cache
        self.stale = False
        return time.perf_counter() - t0

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # ---------------------------------------------------------------------------------- rollouts

    def _seeds(self, n: int) -> list[int | None]:
        """One sampling seed per request from this rank's torch RNG (saved in checkpoints and restored on
        resume), mixed with the rank so that ranks starting from the same seed sample differently. Greedy
        and beam draw nothing: the RNG stream (dropout, data order) stays the one the HF engine leaves."""
        if self.settings.decode_mode != "sample":
            return [None] * n
        rank, _ = world()
        draws = torch.randint(0, 2**62, (n,), dtype=torch.int64).tolist()
        return [(d * 1_000_003 + rank) % MAX_SEED for d in draws]

    def _request(self, p: PromptEncoding) -> dict:
        ids = collapse_image_runs(p)
        if len(ids) != p.input_ids.numel() and p.image is None:
            raise ValueError("a prompt with image tokens needs its image (PromptEncoding.image) for the vLLM engine")
        n = p.input_ids.numel()
        if n + self.settings.max_new_tokens > self.max_model_len:
            from src.config.loader import ConfigError

            raise ConfigError(f"custom.extra.rollout_matching.vllm.max_model_len: {self.max_model_len} is too small for a "
                              f"{n}-token prompt + max_new_tokens {self.settings.max_new_tokens}; raise it")
        request = {"prompt_token_ids": ids}
        if p.image is not None:
            request["multi_modal_data"] = {"image": p.image}
        return request

    @contextlib.contextmanager
    def _recording_requests(self) -> Iterator[list[str]]:
        """Image digests of the requests vLLM hands to its engine core, in the order they are added."""
        core = self.llm.llm_engine.engine_core
        add, digests = core.add_request, []

        def add_request(request, *args, **kwargs):
            digests.append(request_image_digest(request))
            return add(request, *args, **kwargs)

        core.add_request = add_request
        try:
            yield digests
        finally:
            del core.add_request  # the instance attribute goes, the class method shows again

    def generate(self, model, prompts: Sequence[PromptEncoding], synced_gpus: bool = False) -> list[Rollout]:
        """One rollout per prompt, in order (``synced_gpus`` is not needed: every rank, or tensor-parallel
        group, runs its own engine)."""
        t0 = time.perf_counter()
        self.start(model)
        pushed = self.stale
        push_s = self.push_weights(model) if pushed else 0.0
        self._wake()
        s = self.settings
        everyone, seeds, lo = self._gather_group(list(prompts), self._seeds(len(prompts)))
        params = sampling_params(s, self.eos_id, self.pad_id, seeds, self.guard, self.min_new_tokens)
        requests = [self._request(p) for p in everyone]
        with self._recording_requests() as digests:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(digests) != len(everyone) or len(outputs) != len(everyone):
            raise RuntimeError(f"vLLM took {len(digests)} requests and returned {len(outputs)} outputs for {len(everyone)} prompts")
        rollouts, engine_tokens = [], 0
        for p, out, digest in zip(prompts, outputs[lo:], digests[lo:]):
            engine_tokens += len(out.outputs[0].token_ids)
            resp, hit_cap, by_guard = finish_response(out.outputs[0].token_ids, self.eos_id, self.pad_id, s.max_new_tokens, self._row_guard())
            rollouts.append(Rollout(prompt=p, response_ids=resp, hit_max_new_tokens=hit_cap, stopped_by_guard=by_guard,
                                    consumed_prompt_ids=tuple(out.prompt_token_ids), consumed_image_digest=digest))
        self._sleep()
        self.last_stats = {"seconds": time.perf_counter() - t0, "new_tokens": float(sum(len(r.response_ids) for r in rollouts)),
                           "engine_tokens": float(engine_tokens),  # what vLLM generated, forced end tokens included
                           "weight_push_s": push_s, "weight_pushes": float(pushed)}
        return rollouts

    def _gather_group(self, prompts: list[PromptEncoding], seeds: list[int]) -> tuple[list[PromptEncoding], list[int], int]:
        """With tensor parallelism the ranks of a group drive ONE engine together and must submit the same
        requests: every rank gets the group's prompts and seeds in rank order, and the offset of its own."""
        if self._tp_group is None:
            return prompts, seeds, 0
        import torch.distributed as dist

        parts: list = [None] * dist.get_world_size(group=self._tp_group)
        dist.all_gather_object(parts, (prompts, seeds), group=self._tp_group)
        me = dist.get_rank(group=self._tp_group)
        lo = sum(len(p) for p, _ in parts[:me])
        return [p for ps, _ in parts for p in ps], [x for _, ss in parts for x in ss], lo

    def _row_guard(self):
        if self.guard is None:
            return None
        from src.rollout_matching.repeat_guard import RowGuard

        return RowGuard(self.table, self.guard)

    def _sleep(self) -> None:
        if self.options.enable_sleep_mode:
            self.llm.sleep(level=1)  # weights to host memory, KV cache freed: the GPU is the trainer's again
            self.asleep = True

