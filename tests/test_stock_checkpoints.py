"""Checkpoints other tools load: stock class names in every directory we write, LoRA adapter checkpoints
(family from the base model, base + adapter in src.infer / src.replay) and ``python -m src.export``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from src.models.build_tiny import ARCHS
from src.models.checkpoints import CheckpointError, training_coord_init, write_model_dir
from src.models.loading import MODEL_CLASSES, load_model_and_processor
from src.models.processor import detect_family, load_processor
from src.models.tokenizer import FIRST_COORD_ID, coord_token_ids

pytest.importorskip("peft")

# What the Hub checkpoints of each family name (Qwen/Qwen2-VL-*, Qwen/Qwen2.5-VL-*, Qwen/Qwen3-VL-*), read
# with transformers 5 (which names the image processor without its backend suffix).
REAL_NAMES = {
    "qwen2_vl": {"architectures": "Qwen2VLForConditionalGeneration", "processor_class": "Qwen2VLProcessor",
                 "video_processor_type": "Qwen2VLVideoProcessor"},
    "qwen2_5_vl": {"architectures": "Qwen2_5_VLForConditionalGeneration", "processor_class": "Qwen2_5_VLProcessor",
                   "video_processor_type": "Qwen2VLVideoProcessor"},
    "qwen3_vl": {"architectures": "Qwen3VLForConditionalGeneration", "processor_class": "Qwen3VLProcessor",
                 "video_processor_type": "Qwen3VLVideoProcessor"},
}
SHARED_NAMES = {"image_processor_type": "Qwen2VLImageProcessor", "tokenizer_class": "Qwen2Tokenizer"}
# Keys under which transformers / peft files name a class to import (auto_map: custom code, never ours).
CLASS_KEYS = {"architectures", "processor_class", "tokenizer_class", "image_processor_type", "video_processor_type",
              "feature_extractor_type", "auto_map", "auto_mapping"}
N_TOKENS = 152669


# --------------------------------------------------------------------------------------- helpers


def class_names(model_dir: Path) -> dict[str, str]:
    """Every class name written in the JSON files of ``model_dir``: ``"file:key.path" -> name``
    (tokenizer.json, the vocabulary, names no class)."""
    found: dict[str, str] = {}

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                path = f"{where}.{k}" if not where.endswith(":") else f"{where}{k}"
                if k in CLASS_KEYS and v is not None:
                    for i, name in enumerate(v if isinstance(v, list) else [v]):
                        found[path if not isinstance(v, list) else f"{path}[{i}]"] = name
                else:
                    walk(v, path)

    for f in sorted(model_dir.glob("*.json")):
        if f.name != "tokenizer.json":
            walk(json.loads(f.read_text()), f"{f.name}:")
    return found


def expected_names(family: str, *, adapter: bool) -> dict[str, str]:
    real = {**REAL_NAMES[family], **SHARED_NAMES}
    names = {
        "processor_config.json:processor_class": real["processor_class"],
        "processor_config.json:image_processor.image_processor_type": real["image_processor_type"],
        "processor_config.json:video_processor.video_processor_type": real["video_processor_type"],
        "tokenizer_config.json:processor_class": real["processor_class"],
        "tokenizer_config.json:tokenizer_class": real["tokenizer_class"],
    }
    if not adapter:
        names["config.json:architectures[0]"] = real["architectures"]
    return names


def assert_stock_names(model_dir: Path, family: str, *, adapter: bool = False) -> None:
    names = class_names(model_dir)
    assert names == expected_names(family, adapter=adapter), model_dir
    for name in names.values():
        assert hasattr(transformers, name), f"{model_dir}: {name} is not a transformers class"


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_stock_loaders_load(model_dir: Path, family: str) -> None:
    """Stock loaders that work without torchvision load the directory as the family's normal checkpoint,
    and our own loader loads the same weights and tokenizer (coord tokens kept)."""
    from transformers.utils import is_torchvision_available

    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert config.model_type == family
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir)
    assert type(model).__name__ == REAL_NAMES[family]["architectures"]

    ours, processor = load_model_and_processor(model_dir)
    assert_same_weights(state(model), state(ours))
    assert len(tokenizer) == len(processor.tokenizer) == N_TOKENS
    assert coord_token_ids(tokenizer) == coord_token_ids(processor.tokenizer) == list(range(FIRST_COORD_ID, N_TOKENS))
    assert type(image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert image_processor.to_dict() == processor.image_processor.to_dict()

    # AutoProcessor builds the stock processor; without torchvision it gets as far as the stock video
    # processor class (before this change it silently returned a bare tokenizer).
    try:
        auto = transformers.AutoProcessor.from_pretrained(model_dir)
    except ImportError as e:
        assert not is_torchvision_available()
        assert f"{REAL_NAMES[family]['video_processor_type']} requires the Torchvision library" in str(e)
    else:
        assert type(auto).__name__ == REAL_NAMES[family]["processor_class"]


def make_adapter_dir(base: Path, out: Path, *, coord_init: str | None = None, train_steps: int = 0):
    """A LoRA adapter directory as a LoRA run writes it (adapter + processor [+ resolved_config.yaml]).

    ``train_steps`` AdamW steps on a sequence of coord tokens (lr 1e-2) change the LoRA weights and the
    coord rows. Returns the peft model (eval mode)."""
    model, processor = load_model_and_processor(base, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                                                coord_init=coord_init or "mean")
    if train_steps:
        ids = torch.tensor([[FIRST_COORD_ID + k for k in (3, 500, 999, 42, 7)] + [151645]])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(train_steps):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if coord_init is not None:
        (out / "resolved_config.yaml").write_text(f"custom:\n  coord_tokens:\n    init: {coord_init}\n")
    return model


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from src.data.make_shapes import make_shapes

    out = tmp_path_factory.mktemp("ckpt_shapes")
    make_shapes(out, num_train=8, num_val=2, seed=0, image_size=64, min_shapes=1, max_shapes=2, kinds=("rectangle",))
    return out


def train_run(model_dir: Path, shapes: Path, out: Path, **extra) -> Path:
    """A stage-1 run through the launcher's ``run`` (Trainer.save_model, trainer checkpoints)."""
    from src.config.loader import config_from_dict, merge
    from src.sft import run

    cfg = {
        "model": {"model_name_or_path": str(model_dir)},
        "custom": {"trainer_variant": "sft", "train_jsonl": str(shapes / "train.jsonl"), "val_jsonl": None},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 5e-2,
                     "logging_steps": 1, "save_strategy": "steps", "save_steps": 1, "report_to": [], "seed": 0},
    }
    run(config_from_dict(merge(cfg, extra)))
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dirs, shapes) -> Path:
    """A run without LoRA (Qwen2.5-VL): output_dir and checkpoint-1/2 are full models."""
    return train_run(tiny_model_dirs["qwen2_5_vl"], shapes, tmp_path_factory.mktemp("full") / "run")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dirs, shapes) -> Path:
    """A LoRA run (Qwen3-VL): output_dir and checkpoint-N are adapters, output_dir/merged a full model."""
    return train_run(tiny_model_dirs["qwen3_vl"], shapes, tmp_path_factory.mktemp("lora") / "run",
                     model={"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}})


# ---------------------------------------------------------------- item 10: stock class names


@pytest.mark.parametrize("arch", ARCHS)
def test_build_tiny_dirs_name_stock_classes_and_stock_loaders_load_them(arch, tiny_model_dirs):
    assert_stock_names(tiny_model_dirs[arch], arch)
    assert_stock_loaders_load(tiny_model_dirs[arch], arch)


def test_run_dirs_and_trainer_checkpoints_name_stock_classes(full_run, lora_run):
    for d in (full_run, full_run / "checkpoint-1", full_run / "checkpoint-2"):
        assert_stock_names(d, "qwen2_5_vl")
    assert_stock_names(lora_run / "merged", "qwen3_vl")
    for d in (lora_run, lora_run / "checkpoint-1", lora_run / "checkpoint-2"):  # adapters: no config.json
        assert_stock_names(d, "qwen3_vl", adapter=True)
    assert_stock_loaders_load(full_run / "checkpoint-1", "qwen2_5_vl")
    assert_stock_loaders_load(lora_run / "merged", "qwen3_vl")


def test_our_loader_still_reads_directories_written_before_the_change(tiny_model_dirs, tiny_loaded, tmp_path):
    """Dirs written before this change name our subclass (``Qwen3VLImageOnlyProcessor``) and have no video
    section: the family comes from config.json, so they still load with the same processor."""
    old = tmp_path / "old"
    shutil.copytree(tiny_model_dirs["qwen3_vl"], old)
    for name in ("processor_config.json", "tokenizer_config.json"):
        data = json.loads((old / name).read_text())
        data["processor_class"] = "Qwen3VLImageOnlyProcessor"
        data.pop("video_processor", None)
        (old / name).write_text(json.dumps(data))
    processor, reference = load_processor(old), tiny_loaded["qwen3_vl"][1]
    assert type(processor) is type(reference) and len(processor.tokenizer) == N_TOKENS
    assert processor.image_processor.to_dict() == reference.image_processor.to_dict()


# ---------------------------------------------------------------- item 11: LoRA adapter checkpoints


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_family_comes_from_the_base_model_never_moe(arch, tiny_model_dirs, tiny_loaded, tmp_path):
    """The bug: a Qwen3-VL adapter dir was detected as qwen3_vl_moe from its processor class and loaded as
    a Qwen3VLMoeForConditionalGeneration with random experts."""
    make_adapter_dir(tiny_model_dirs[arch], tmp_path / "adapter")  # untrained: LoRA B = 0, coord-row delta = 0
    assert detect_family(tmp_path / "adapter") == arch
    model, processor = load_model_and_processor(tmp_path / "adapter")
    assert type(model).__name__ == MODEL_CLASSES[arch]
    assert not any("lora_" in n or "token_adapter" in n for n, _ in model.named_modules())
    assert_same_weights(state(model), state(tiny_loaded[arch][0]))  # the base's weights: nothing random
    assert len(processor.tokenizer) == N_TOKENS


@pytest.mark.parametrize("case", ["tiny_tied", "real_layout_without_coord_tokens"])
def test_export_merges_lora_and_trained_coord_rows(case, tiny_model_dirs, qwen_like_checkpoint, tmp_path, capsys):
    """Train a LoRA model two steps (coord rows included), export: the exported model's logits equal the
    peft model's, and differ from the base's (so a merge that dropped the adapter or the coord rows fails).

    real_layout: a base WITHOUT coord tokens (151,936 untied rows): the tokens were added and their rows
    initialised ("random" here, from the run's resolved_config.yaml) before training, and loading must
    redo exactly that before applying the adapter's coord-row deltas."""
    from src.export import main as export_main

    base, coord_init = (tiny_model_dirs["qwen3_vl"], None) if case == "tiny_tied" else (qwen_like_checkpoint, "random")
    adapter = tmp_path / "run"
    peft_model = make_adapter_dir(base, adapter, coord_init=coord_init, train_steps=2)
    if coord_init is not None:
        assert training_coord_init(adapter / "checkpoint-x") == training_coord_init(adapter) == "random"

    assert export_main(["--checkpoint", str(adapter), "--out", str(tmp_path / "exported")]) == 0
    exported = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "exported")

    ids = torch.tensor([[FIRST_COORD_ID + k for k in (3, 500, 999)] + [151645, 100, 151644]])
    with torch.no_grad():
        want, got = peft_model(input_ids=ids).logits, exported(input_ids=ids).logits
        with peft_model.disable_adapter():  # the base, coord rows as initialised before training
            before = peft_model(input_ids=ids).logits
            base_rows = peft_model.get_input_embeddings()(torch.arange(FIRST_COORD_ID, N_TOKENS))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - before).abs().max() > 1e-2  # the adapter changed the model well beyond the tolerance
    trained_rows = exported.get_input_embeddings().weight[FIRST_COORD_ID:]
    assert (trained_rows - base_rows).abs().amax(1).min() > 0  # every coord row carries its training
    assert_stock_names(tmp_path / "exported", "qwen3_vl" if case == "tiny_tied" else "qwen2_5_vl")
    assert "merged LoRA adapter" in capsys.readouterr().err


def test_export_of_a_lora_run_equals_its_merged_dir_and_loads_with_stock_classes(lora_run, tmp_path):
    from src.export import main as export_main

    assert export_main(["--checkpoint", str(lora_run), "--out", str(tmp_path / "exp")]) == 0
    assert_stock_names(tmp_path / "exp", "qwen3_vl")
    exported = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "exp")
    merged = transformers.AutoModelForImageTextToText.from_pretrained(lora_run / "merged")
    assert_same_weights(state(exported), state(merged))  # sft's save_merged_lora and src.export: one merge
    # and from a trainer checkpoint-N (its resolved_config.yaml lives in the parent run dir)
    assert export_main(["--checkpoint", str(lora_run / "checkpoint-1"), "--out", str(tmp_path / "exp1")]) == 0
    assert sorted(p.name for p in (tmp_path / "exp1").iterdir()) == sorted(p.name for p in (tmp_path / "exp").iterdir())


def test_export_of_a_full_checkpoint_is_a_clean_model_dir(full_run, tmp_path):
    from src.export import main as export_main

    ckpt = full_run / "checkpoint-1"
    assert (ckpt / "optimizer.pt").exists()
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "clean")]) == 0
    files = {p.name for p in (tmp_path / "clean").iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                     "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    load = transformers.AutoModelForImageTextToText.from_pretrained
    assert_same_weights(state(load(tmp_path / "clean")), state(load(ckpt)))


def test_lora_run_trained_the_adapter(lora_run, tiny_loaded):
    """Guard for the infer / replay comparisons below: the LoRA run really changed the model."""
    merged = state(transformers.AutoModelForImageTextToText.from_pretrained(lora_run / "merged"))
    base = state(tiny_loaded["qwen3_vl"][0])
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])
    embed = "model.language_model.embed_tokens.weight"
    assert not torch.equal(merged[embed][FIRST_COORD_ID:], base[embed][FIRST_COORD_ID:])


def test_infer_on_an_adapter_dir_equals_the_merged_model(lora_run, shapes, tmp_path):
    from src.infer import main as infer_main

    decoding = tmp_path / "decoding.yaml"
    decoding.write_text("custom:\n  extra:\n    rollout_matching:\n      max_new_tokens: 24\n")
    outputs = {}
    for name, model_dir in (("adapter", lora_run), ("checkpoint", lora_run / "checkpoint-2"), ("merged", lora_run / "merged")):
        out = tmp_path / f"{name}.jsonl"
        args = ["--model", str(model_dir), "--jsonl", str(shapes / "val.jsonl"), "--out", str(out), "--config", str(decoding)]
        assert infer_main(args) == 0
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outputs["merged"]) == 2 and all(line["raw_text"] for line in outputs["merged"])
    assert outputs["adapter"] == outputs["merged"] == outputs["checkpoint"]  # greedy: same text, same boxes


def copy_adapter(src: Path, dst: Path, *, base: str | None = None, tokenizer: bool = True) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint-*", "merged", "runs", "optimizer.pt"))
    if base is not None:
        config = json.loads((dst / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (dst / "adapter_config.json").write_text(json.dumps(config))
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (dst / name).unlink()
    return dst


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_infer_names_the_missing_base_model(lora_run, shapes, tmp_path, capsys):
    from src.infer import main as infer_main

    missing = str(tmp_path / "no_such_base")
    adapter = copy_adapter(lora_run, tmp_path / "adapter", base=missing)
    assert infer_main(["--model", str(adapter), "--jsonl", str(shapes / "val.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 2
    line = one_error_line(capsys)
    assert missing in line and "base_model_name_or_path" in line
    assert not (tmp_path / "p.jsonl").exists()


def test_replay_needs_the_base_only_without_a_tokenizer_of_its_own(lora_run, tmp_path, capsys):
    from src.replay import main as replay_main

    missing = str(tmp_path / "no_such_base")
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(json.dumps({"id": "a", "response_text": "{}", "objects": []}) + "\n")
    with_tokenizer = copy_adapter(lora_run, tmp_path / "adapter", base=missing)
    assert replay_main(["--model", str(with_tokenizer), "--rollouts", str(rollouts), "--out", str(tmp_path / "a.jsonl")]) == 0
    capsys.readouterr()
    bare = copy_adapter(lora_run, tmp_path / "bare", base=missing, tokenizer=False)
    assert replay_main(["--model", str(bare), "--rollouts", str(rollouts), "--out", str(tmp_path / "o.jsonl")]) == 2
    line = one_error_line(capsys)
    assert missing in line and "base_model_name_or_path" in line
    assert not (tmp_path / "o.jsonl").exists()


def test_replay_on_an_adapter_dir_uses_its_tokenizer(lora_run, tiny_model_dirs, tmp_path, capsys):
    """The adapter dir's own tokenizer (with the coord tokens) is used; without one, its base model's."""
    from src.replay import main as replay_main

    text = '{"object_1": {"desc": "box", "bbox_2d": ["<|coord_10|>", "<|coord_20|>", "<|coord_300|>", "<|coord_400|>"]}}'
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(json.dumps({"id": "a", "response_text": text, "objects": [{"desc": "box", "bbox_2d": [12, 20, 300, 390]}]}) + "\n")
    bare = copy_adapter(lora_run, tmp_path / "bare", base=str(tiny_model_dirs["qwen3_vl"]), tokenizer=False)
    results = {}
    for name, model_dir in (("adapter", lora_run), ("bare", bare), ("merged", lora_run / "merged")):
        assert replay_main(["--model", str(model_dir), "--rollouts", str(rollouts), "--out", str(tmp_path / f"{name}.jsonl")]) == 0
        capsys.readouterr()
        results[name] = json.loads((tmp_path / f"{name}.jsonl").read_text())
        results[name].pop("timing_ms")
    assert results["adapter"] == results["merged"] == results["bare"]
    assert results["adapter"]["matched_for_supervision"] == 1


# ---------------------------------------------------------------- src.export: bad inputs, atomic writes


def test_export_bad_inputs_exit_2_with_one_line_and_write_nothing(lora_run, qwen_like_checkpoint, tmp_path, capsys):
    from src.export import main as export_main

    out = tmp_path / "out"
    existing = tmp_path / "existing"
    existing.mkdir()
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "absent", out, "not a directory"),
        (tmp_path / "empty", out, "neither a model (config.json) nor a LoRA adapter"),
        (lora_run, existing, "already exists"),
        (copy_adapter(lora_run, tmp_path / "orphan", base=str(tmp_path / "gone")), out, "base_model_name_or_path"),
        (qwen_like_checkpoint, out, "no coord tokens"),
    ]
    for checkpoint, target, needle in cases:
        assert export_main(["--checkpoint", str(checkpoint), "--out", str(target)]) == 2
        assert needle in one_error_line(capsys), needle
        assert not out.exists()
    assert list(existing.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_model_dir_leaves_nothing_half_written(tiny_loaded, tmp_path):
    model, processor = tiny_loaded["qwen2_vl"]

    class Broken:
        def save_pretrained(self, path):
            (Path(path) / "partial").write_text("x")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_model_dir(model, Broken(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
    write_model_dir(model, processor, tmp_path / "m")
    with pytest.raises(CheckpointError, match="already exists"):
        write_model_dir(model, processor, tmp_path / "m")
    write_model_dir(model, processor, tmp_path / "m", overwrite=True)  # sft's merged/ on a re-run
    (tmp_path / "plain").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "plain"]
    assert (tmp_path / "m").stat().st_mode == (tmp_path / "plain").stat().st_mode  # not a private 0700 temp dir
