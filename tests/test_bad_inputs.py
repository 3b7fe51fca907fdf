"""Bad inputs are refused clearly (reliability issue, item 2).

Every case goes through the launcher (``src.sft.main``): exit code 2, exactly ONE line on stderr that
starts with ``error:``, names the file:line / key / directory and says what is wrong, no traceback, and
nothing written to ``training.output_dir``. Config, data and model cases run once each as a real
``python -m src.sft`` subprocess; the rest call ``main(argv)`` in-process (same code path, faster).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src.sft import EXIT_BAD_INPUT, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from src.data.make_shapes import make_shapes

    out = tmp_path_factory.mktemp("bad_inputs_shapes")
    make_shapes(out, num_train=4, num_val=2, seed=3, image_size=64, min_shapes=1, max_shapes=2, kinds=("rectangle", "triangle"))
    return out


def good_lines(shapes: Path) -> list[dict]:
    return [json.loads(s) for s in (shapes / "train.jsonl").read_text().splitlines()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_config(tmp_path: Path, model_dir, train_jsonl, variant="sft", **sections) -> tuple[Path, Path]:
    out = tmp_path / "run"
    cfg = {
        "model": {"model_name_or_path": str(model_dir)},
        "custom": {"trainer_variant": variant, "train_jsonl": str(train_jsonl),
                   "extra": {"rollout_matching": {"max_new_tokens": 8, "decode_batch_size": 2}}},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 2, "max_steps": 1, "save_strategy": "no",
                     "report_to": [], "seed": 0},
    }
    for k, v in sections.items():
        from src.config.loader import merge

        cfg = merge(cfg, {k: v})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, out


def refused_in_process(capsys, cfg: Path, out: Path, *needles: str) -> str:
    rc = main(["--config", str(cfg)])
    err = capsys.readouterr().err
    return check_refusal(rc, err, out, needles)


def refused_subprocess(cfg: Path, out: Path, *needles: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "src.sft", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    err = "\n".join(line for line in r.stderr.splitlines() if not _harmless(line))
    return check_refusal(r.returncode, err, out, needles)


def _harmless(line: str) -> bool:
    return "Warning" in line and "error:" not in line


def check_refusal(rc: int, err: str, out: Path, needles) -> str:
    lines = [s for s in err.strip().splitlines() if s.strip()]
    assert rc == EXIT_BAD_INPUT, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists(), f"{out} was (half-)written"
    MESSAGES.append(lines[0])
    return lines[0]


MESSAGES: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def show_messages(request):
    yield
    rep = request.config.pluginmanager.get_plugin("terminalreporter")
    if rep is not None and request.config.getoption("verbose") > 0:
        for m in MESSAGES:
            rep.write_line(f"[bad-input] {m}")


# ------------------------------------------------------------------------------------------- data


def test_malformed_jsonl_line_subprocess(tmp_path, shapes, tiny_model_dirs):
    rows = good_lines(shapes)
    data = write_jsonl(shapes / "malformed.jsonl", [rows[0], '{"images": ["x.png"], "width": 64,', rows[1]])
    cfg, out = write_config(tmp_path, tiny_model_dirs["qwen3_vl"], data)
    refused_subprocess(cfg, out, "malformed.jsonl:2", "malformed JSON")


def mutate(shapes: Path, name: str, fn) -> Path:
    rows = good_lines(shapes)
    fn(rows[1])
    return write_jsonl(shapes / f"{name}.jsonl", rows)


DATA_CASES = {
    "missing_field": (lambda r: r.pop("width"), ["missing_field.jsonl:2", "missing required key 'width'"]),
    "two_geometries": (lambda r: r["objects"][0].update(bbox_2d=[1, 2, 10, 12], poly=[1, 2, 10, 2, 5, 9]),
                       ["two_geometries.jsonl:2", "objects[0]", "exactly one geometry"]),
    "odd_polygon": (lambda r: r["objects"].__setitem__(0, {"desc": "tri", "poly": [1, 2, 10, 2, 5]}),
                    ["odd_polygon.jsonl:2", "objects[0]", "even number"]),
    "outside_image": (lambda r: r["objects"].__setitem__(0, {"desc": "box", "bbox_2d": [1, 2, 300, 12]}),
                      ["outside_image.jsonl:2", "objects[0]", "outside the image", "fix the annotation"]),
    "empty_desc": (lambda r: r["objects"][0].update(desc="  "), ["empty_desc.jsonl:2", "'desc' must be a non-empty string"]),
    "unknown_geometry": (lambda r: r["objects"].__setitem__(0, {"desc": "x", "box": [1, 2, 3, 4]}), ["unknown_geometry.jsonl:2", "'box'"]),
    "missing_image": (lambda r: r.update(images=["images/nope.png"]), ["missing_image.jsonl:2", "image file not found", "nope.png"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_record(capsys, tmp_path, shapes, tiny_model_dirs, case):
    fn, needles = DATA_CASES[case]
    data = mutate(shapes, case, fn)
    cfg, out = write_config(tmp_path, tiny_model_dirs["qwen3_vl"], data)
    refused_in_process(capsys, cfg, out, *needles)


def test_unreadable_image_refused_before_the_model_loads(capsys, tmp_path, shapes, tiny_model_dirs, monkeypatch):
    """A file of garbage bytes named .png: refused at load time (every image header is opened once), so
    no model is loaded and nothing is written."""
    (shapes / "images" / "garbage.png").write_bytes(b"\x00garbage, not a PNG\xff" * 10)
    data = mutate(shapes, "garbage", lambda r: r.update(images=["images/garbage.png"]))
    cfg, out = write_config(tmp_path, tiny_model_dirs["qwen3_vl"], data)
    import src.models.loading as loading

    monkeypatch.setattr(loading, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded before the data was checked"))
    refused_in_process(capsys, cfg, out, "garbage.jsonl:2", "cannot read image", "garbage.png")


def test_record_size_differs_from_the_image_subprocess(tmp_path, shapes, tiny_model_dirs):
    """The record says 96x64 but the file is 64x64: every target would be scaled wrongly. Refused
    through ``python -m src.sft`` before any model loads, naming file:line and both sizes."""
    data = mutate(shapes, "size_mismatch", lambda r: r.update(width=96))
    image = shapes / good_lines(shapes)[1]["images"][0]
    cfg, out = write_config(tmp_path, tiny_model_dirs["qwen3_vl"], data)
    refused_subprocess(cfg, out, "size_mismatch.jsonl:2: the record says 96x64 (width x height) but",
                       f"{image} is 64x64 (stored pixels, EXIF orientation not applied)",
                       "fix the record's width/height or the image")


def test_image_unreadable_during_training_is_one_line_too(capsys, tmp_path, shapes, tiny_model_dirs):
    """An image that breaks AFTER the load-time check (deleted / corrupted mid-run) raises DataError in
    the collator inside trainer.train(): the launcher still prints one line and exits 2."""
    import src.sft as sft

    d = tmp_path / "data"
    shutil.copytree(shapes, d)
    cfg, out = write_config(tmp_path, tiny_model_dirs["qwen3_vl"], d / "train.jsonl")
    orig = sft.load_records

    def load_then_corrupt(c):
        recs = orig(c)
        for r in recs[0]:
            r.image.write_bytes(b"corrupted after the check")
        return recs

    sft.load_records = load_then_corrupt
    try:
        rc = main(["--config", str(cfg)])
    finally:
        sft.load_records = orig
    err = capsys.readouterr().err
    # Training had started: tqdm's progress bar shares stderr (its \r-redraws surround the message).
    import re

    assert "Traceback" not in err and err.count("error: ") == 1, err
    lines = re.findall(r"error: [^\r\n]*", err)
    assert rc == EXIT_BAD_INPUT and len(lines) == 1 and "cannot read image" in lines[0], err
    assert "train.jsonl:" in lines[0]  # the record's file:line
    MESSAGES.append(lines[0])


def test_train_jsonl_missing(capsys, tmp_path, tiny_model_dirs):
    cfg, out = write_config(tmp_path, tiny_model_dirs["qwen3_vl"], tmp_path / "nope.jsonl")
    refused_in_process(capsys, cfg, out, "nope.jsonl", "file not found")


# ----------------------------------------------------------------------------------------- config


def test_unknown_config_key_subprocess(tmp_path, shapes, tiny_model_dirs):
    cfg, out = write_config(tmp_path, tiny_model_dirs["qwen3_vl"], shapes / "train.jsonl", training={"learning_rat": 1e-3})
    refused_subprocess(cfg, out, "training.learning_rat", "learning_rate")


@pytest.mark.parametrize("section,value,needles", [
    ("custom", {"extra": {"rollout_matching": {"max_new_tokens": "many"}}}, ["custom.extra.rollout_matching.max_new_tokens", "integer"]),
    ("model", {"add_coord_tokens": "yes"}, ["model.add_coord_tokens", "true/false"]),
    ("custom", {"trainer_variant": "rl"}, ["custom.trainer_variant", "must be one of"]),
    ("training", {"learning_rate": "fast"}, ["training.learning_rate"]),
    ("custom", {"extra": {"rollout_matching": {"maskiou_gat": 0.3}}}, ["maskiou_gat", "maskiou_gate"]),
])
def test_wrong_types_and_unknown_keys(capsys, tmp_path, shapes, tiny_model_dirs, section, value, needles):
    cfg, out = write_config(tmp_path, tiny_model_dirs["qwen3_vl"], shapes / "train.jsonl", **{section: value})
    refused_in_process(capsys, cfg, out, *needles)


def test_packing_with_stage2(capsys, tmp_path, shapes, tiny_model_dirs):
    cfg, out = write_config(tmp_path, tiny_model_dirs["qwen3_vl"], shapes / "train.jsonl", variant="rollout_matching_sft",
                            training={"packing": True})
    refused_in_process(capsys, cfg, out, "training.packing", "set training.packing: false")


def test_invalid_yaml(capsys, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  model_name_or_path: [unclosed\n")
    refused_in_process(capsys, p, tmp_path / "run", "bad.yaml", "invalid YAML")


# ------------------------------------------------------------------------------------------ model


def test_missing_model_dir_subprocess(tmp_path, shapes):
    cfg, out = write_config(tmp_path, tmp_path / "no_such_model", shapes / "train.jsonl")
    refused_subprocess(cfg, out, "no_such_model")


def test_model_without_coord_tokens_and_no_adding(capsys, tmp_path, shapes, qwen_like_checkpoint):
    cfg, out = write_config(tmp_path, qwen_like_checkpoint, shapes / "train.jsonl", model={"add_coord_tokens": False})
    refused_in_process(capsys, cfg, out, str(qwen_like_checkpoint), "lacks the coord tokens", "model.add_coord_tokens: true")


def test_model_dir_without_weights(capsys, tmp_path, shapes, tiny_model_dirs):
    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_model_dirs["qwen3_vl"], broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    cfg, out = write_config(tmp_path, broken, shapes / "train.jsonl")
    refused_in_process(capsys, cfg, out, "broken_model", "cannot load the model weights", "complete checkpoint")


def test_skipped_lines_are_reported_for_the_validation_file_too(shapes, tmp_path, capsys):
    """custom.on_invalid_record: skip counts and reports skipped lines of BOTH files (the validation file's
    used to vanish silently)."""
    from src.config.loader import config_from_dict
    from src.sft import load_records

    rows = good_lines(shapes)
    train = write_jsonl(shapes / "skip_train.jsonl", rows[:3] + ["{not json"])  # next to the images (relative paths)
    val = write_jsonl(shapes / "skip_val.jsonl", [rows[3], {**rows[0], "objects": [{"desc": ""}]}, "{broken"])
    cfg = config_from_dict({"model": {"model_name_or_path": "m"},
                            "custom": {"train_jsonl": str(train), "val_jsonl": str(val), "on_invalid_record": "skip"}})
    tr, va = load_records(cfg)
    assert (len(tr), len(va)) == (3, 1)
    out = capsys.readouterr().out
    assert f"[data] skipped 1 invalid line(s) of {train} (custom.on_invalid_record: skip); first: {train}:4: malformed JSON" in out
    assert f"[data] skipped 2 invalid line(s) of {val} (custom.on_invalid_record: skip); first: {val}:2: objects[0]:" in out
