"""``python -m src.replay``: recorded rollouts -> parse / match / Y_train records + SPEC §13 counters.

Most tests call ``main(argv)`` in-process against a tokenizer-only model directory (saved once per
module and loaded with AutoTokenizer, as the CLI does); one test runs the real subprocess.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from src.config.loader import ConfigError, load_rollout_matching
from src.config.schema import RolloutMatchingConfig
from src.data.coords import coord_token, parse_coord_token
from src.data.objects import DetObject
from src.data.serialize import serialize_objects
from src.replay import load_token_table, main
from src.rollout_matching.matcher import match_objects
from src.rollout_matching.parser import parse_rollout, prefix_text
from src.rollout_matching.stats import match_kwargs
from src.rollout_matching.targets import build_train_target

REPO = Path(__file__).resolve().parents[1]
OUTPUT_KEYS = {
    "id", "truncated", "malformed", "fallback", "cut_backoffs", "dropped_invalid", "max_object_index",
    "valid_objects", "prefix_text", "matches", "match_iou", "fp", "fn", "gating_rejections",
    "matched_for_supervision", "excluded_from_supervision", "fn_appended", "fragment", "y_train_text",
    "ce_token_count", "coord_targets", "timing_ms",
}
COUNTER_KEYS = {
    "rollout/parse_dropped_invalid", "rollout/parse_truncated", "rollout/parse_malformed", "rollout/valid_pred_objects",
    "rollout/matched_for_supervision", "rollout/excluded_from_supervision", "rollout/fn_appended",
    "rollout/gating_rejections", "rollout/gt_objects", "rollout/match_rate", "samples", "ms_per_sample",
}

GT = [
    DetObject("red square", "bbox_2d", (100, 100, 300, 300)),
    DetObject("blue triangle", "poly", (500, 500, 700, 500, 600, 700)),
    DetObject('wörd "q" 猫', "bbox_2d", (700, 100, 900, 250)),
]
PREDS = [
    DetObject("red square", "bbox_2d", (104, 98, 297, 305)),
    DetObject("blue triangle", "poly", (505, 498, 695, 503, 601, 690)),
    DetObject("ghost", "bbox_2d", (20, 800, 80, 900)),
]


def gt_json(objects, as_tokens=False):
    """GT objects in the input format: bins as ints, or as coord-token strings."""
    return [{"desc": o.desc, o.geometry: [coord_token(b) if as_tokens else b for b in o.bins]} for o in objects]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen_tokenizer):
    path = tmp_path_factory.mktemp("tok_model")
    qwen_tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln, ensure_ascii=False)) + "\n" for ln in lines), encoding="utf-8")
    return path


def run_main(model_dir, tmp_path, lines, capsys, config=None, name="in.jsonl"):
    src = write_jsonl(tmp_path / name, lines)
    out = tmp_path / "out.jsonl"
    argv = ["--model", str(model_dir), "--rollouts", str(src), "--out", str(out)]
    if config is not None:
        argv += ["--config", str(config)]
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, out, err


def records_and_counters(rc, out, err):
    assert rc == 0, err
    records = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]
    counters = json.loads(err.strip().splitlines()[-1])
    return records, counters


def test_the_model_dir_tokenizer_is_the_qwen_one(model_dir, token_table):
    table = load_token_table(model_dir)
    assert table.pieces == token_table.pieces
    assert table.im_end_id == token_table.im_end_id
    assert (table.coord_ids == token_table.coord_ids).all()


# ------------------------------------------------------------------------- records vs the core


def sample_lines(table):
    full = serialize_objects(PREDS)
    dup = serialize_objects([PREDS[0], PREDS[0], PREDS[1]])
    mixed = serialize_objects([DetObject("blue triangle", "bbox_2d", (498, 497, 702, 705)), DetObject("red square", "poly", (101, 100, 300, 102, 298, 299, 99, 301))])
    gts = gt_json(GT)
    return [
        {"id": "valid_ids", "response_token_ids": table.encode(full) + [table.im_end_id] + table.encode("junk"), "objects": gts},
        {"id": "truncated_text", "response_text": full[: full.index('"object_2"') + 40], "objects": gts},
        {"id": "garbage", "response_text": "Sorry, I can't see any objects here.", "objects": gts},
        {"id": "zero_gt", "response_text": full, "objects": []},
        {"id": "duplicates", "response_token_ids": table.encode(dup), "objects": gts},
        {"id": "poly_tokens", "response_text": mixed, "objects": gt_json(GT[:2], as_tokens=True)},
        {"id": "empty", "response_token_ids": [], "objects": gts[:1]},
    ]


def test_every_output_key_matches_direct_calls_of_the_core(model_dir, tmp_path, capsys, token_table):
    table, rm = token_table, RolloutMatchingConfig()
    lines = sample_lines(table)
    records, _ = records_and_counters(*run_main(model_dir, tmp_path, lines, capsys))
    assert [r["id"] for r in records] == [ln["id"] for ln in lines]

    for line, rec in zip(lines, records):
        assert set(rec) == OUTPUT_KEYS, rec["id"]
        ids = line["response_token_ids"] if "response_token_ids" in line else table.encode(line["response_text"])
        gts = [DetObject(o["desc"], g, tuple(v if isinstance(v, int) else parse_coord_token(v) for v in o[g])) for o in line["objects"] for g in ("bbox_2d", "poly") if g in o]
        parsed = parse_rollout(ids, table)
        m = match_objects([o.to_det_object() for o in parsed.objects], gts, **match_kwargs(rm))
        tt = build_train_target(parsed, gts, m, table, ot_cost=rm.ot_cost, ot_epsilon=rm.ot_epsilon, ot_iters=rm.ot_iters, supervise_eos=rm.supervise_eos, fn_ordering="sorted")

        assert rec["truncated"] == parsed.truncated and rec["malformed"] == parsed.malformed
        assert rec["fallback"] == parsed.fallback and rec["cut_backoffs"] == parsed.cut_backoffs
        assert rec["dropped_invalid"] == parsed.dropped_invalid
        assert rec["max_object_index"] == parsed.max_object_index
        assert rec["valid_objects"] == [
            {"key": o.key, "geometry": o.geometry, "bins": list(o.bins), "coord_positions": list(o.coord_positions)} for o in parsed.objects
        ]
        for o in rec["valid_objects"]:  # response positions of the coord tokens, 1:1 with the bins
            assert [table.bin_of(ids[p]) for p in o["coord_positions"]] == o["bins"]
        assert rec["prefix_text"] == prefix_text(parsed, table)
        assert rec["matches"] == [list(x) for x in m.matches]
        assert rec["match_iou"] == pytest.approx(list(m.match_iou), abs=1e-4)
        assert rec["fp"] == list(m.fp) and rec["fn"] == list(m.fn)  # no target failures in these cases
        assert rec["gating_rejections"] == m.gating_rejections
        assert rec["matched_for_supervision"] == tt.matched_for_supervision
        assert rec["excluded_from_supervision"] == tt.excluded_from_supervision
        assert rec["fn_appended"] == tt.fn_appended == len(rec["fn"])
        assert rec["fragment"] == tt.fragment.text
        assert rec["y_train_text"] == table.text(tt.y_ids) == rec["prefix_text"] + rec["fragment"] + "<|im_end|>"
        assert rec["ce_token_count"] == len(tt.ce_positions)
        assert rec["coord_targets"] == [list(c) for c in tt.coord_targets]
        for pos, b, seg in rec["coord_targets"]:
            assert table.bin_of(tt.y_ids[pos]) >= 0 and (seg == "prefix") == (pos < tt.prefix_len)
        assert set(rec["timing_ms"]) == {"parse", "match", "targets"}
        assert all(isinstance(v, float) and v >= 0 for v in rec["timing_ms"].values())

    by_id = {r["id"]: r for r in records}
    assert by_id["valid_ids"]["matches"] == [[0, 0], [1, 1]] and by_id["valid_ids"]["fp"] == [2] and by_id["valid_ids"]["fn"] == [2]
    assert not by_id["valid_ids"]["truncated"] and not by_id["valid_ids"]["malformed"]
    assert by_id["truncated_text"]["truncated"] and by_id["truncated_text"]["dropped_invalid"] == 1
    assert len(by_id["truncated_text"]["valid_objects"]) == 1 and by_id["truncated_text"]["fn"] == [1, 2]
    assert by_id["garbage"]["malformed"] and by_id["garbage"]["prefix_text"] == "{" and by_id["garbage"]["fn"] == [0, 1, 2]
    assert by_id["zero_gt"]["fp"] == [0, 1, 2] and by_id["zero_gt"]["fragment"] == "}" and by_id["zero_gt"]["matches"] == []
    dup = by_id["duplicates"]
    assert [o["bins"] for o in dup["valid_objects"]][:2] == [list(PREDS[0].bins)] * 2
    assert len(dup["matches"]) == 2 and len(dup["fp"]) == 1 and dup["fn"] == [2]
    poly = by_id["poly_tokens"]  # bbox pred vs poly GT and poly pred vs bbox GT: both through OT
    assert sorted(poly["matches"]) == [[0, 1], [1, 0]]
    assert sum(seg == "prefix" for _, _, seg in poly["coord_targets"]) == 4 + 8
    assert by_id["empty"]["truncated"] and by_id["empty"]["fn"] == [0]


def test_counters_are_the_sums_over_the_file(model_dir, tmp_path, capsys, token_table):
    lines = sample_lines(token_table)
    records, c = records_and_counters(*run_main(model_dir, tmp_path, lines, capsys))
    assert set(c) == COUNTER_KEYS
    assert c["samples"] == len(lines)
    assert c["rollout/gt_objects"] == sum(len(ln["objects"]) for ln in lines)
    assert c["rollout/parse_dropped_invalid"] == sum(r["dropped_invalid"] for r in records)
    assert c["rollout/parse_truncated"] == sum(r["truncated"] for r in records) == 2
    assert c["rollout/parse_malformed"] == sum(r["malformed"] for r in records)
    assert c["rollout/valid_pred_objects"] == sum(len(r["valid_objects"]) for r in records)
    for k in ("matched_for_supervision", "excluded_from_supervision", "fn_appended", "gating_rejections"):
        assert c[f"rollout/{k}"] == sum(r[k] for r in records), k
    assert c["rollout/match_rate"] == pytest.approx(c["rollout/matched_for_supervision"] / c["rollout/gt_objects"])
    for k in ("parse", "match", "targets"):
        assert c["ms_per_sample"][k] == pytest.approx(sum(r["timing_ms"][k] for r in records) / len(records), abs=1e-3)


def test_empty_file_and_no_gt_give_zero_rates(model_dir, tmp_path, capsys):
    records, c = records_and_counters(*run_main(model_dir, tmp_path, [], capsys))
    assert records == [] and c["samples"] == 0 and c["rollout/match_rate"] == 0.0
    assert c["ms_per_sample"] == {"parse": 0.0, "match": 0.0, "targets": 0.0}
    _, c = records_and_counters(*run_main(model_dir, tmp_path, [{"id": "a", "response_text": "{}", "objects": []}], capsys))
    assert c["rollout/gt_objects"] == 0 and c["rollout/match_rate"] == 0.0


# ------------------------------------------------------------------------------------- config


GATE_LINE = {  # box IoU = maskIoU = 2/3: matched at the default gate 0.3, gated at 0.9
    "id": "gate", "response_text": serialize_objects([DetObject("cat", "bbox_2d", (100, 100, 200, 250))]),
    "objects": [{"desc": "cat", "bbox_2d": [100, 100, 200, 200]}],
}


def test_config_maskiou_gate_changes_matching(model_dir, tmp_path, capsys):
    (rec,), c = records_and_counters(*run_main(model_dir, tmp_path, [GATE_LINE], capsys))
    assert rec["matches"] == [[0, 0]] and rec["gating_rejections"] == 0 and c["rollout/match_rate"] == 1.0

    cfg = tmp_path / "gate.yaml"
    cfg.write_text("custom:\n  extra:\n    rollout_matching:\n      maskiou_gate: 0.9\n")
    (rec,), c = records_and_counters(*run_main(model_dir, tmp_path, [GATE_LINE], capsys, config=cfg))
    assert rec["matches"] == [] and rec["fp"] == [0] and rec["fn"] == [0] and rec["gating_rejections"] == 1
    assert c["rollout/gating_rejections"] == 1 and c["rollout/match_rate"] == 0.0 and c["rollout/fn_appended"] == 1


def test_load_rollout_matching_reads_only_its_section(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model:\n  model_name_or_path: nowhere\ntraining:\n  not_a_training_arg: 1\n"
        "custom:\n  trainer_variant: rollout_matching_sft\n  extra:\n    rollout_matching:\n      candidate_top_k: 3\n      fn_cost: 4\n"
    )
    (tmp_path / "full.yaml").write_text("extends: base.yaml\ncustom:\n  extra:\n    rollout_matching:\n      maskiou_gate: 0.5\n")
    rm = load_rollout_matching(tmp_path / "full.yaml")
    assert (rm.candidate_top_k, rm.fn_cost, rm.maskiou_gate) == (3, 4.0, 0.5)
    assert rm.fp_cost == RolloutMatchingConfig().fp_cost

    (tmp_path / "none.yaml").write_text("model:\n  model_name_or_path: x\n")
    assert load_rollout_matching(tmp_path / "none.yaml") == RolloutMatchingConfig()

    (tmp_path / "typo.yaml").write_text("custom:\n  extra:\n    rollout_matching:\n      maskiou_gat: 0.5\n")
    with pytest.raises(ConfigError, match=r"custom\.extra\.rollout_matching\.maskiou_gat: unknown key \(did you mean 'maskiou_gate'\?\)"):
        load_rollout_matching(tmp_path / "typo.yaml")
    (tmp_path / "flat.yaml").write_text("maskiou_gate: 0.5\n")
    with pytest.raises(ConfigError, match="belong under custom.extra.rollout_matching"):
        load_rollout_matching(tmp_path / "flat.yaml")
    (tmp_path / "type.yaml").write_text("custom:\n  extra:\n    rollout_matching:\n      candidate_top_k: many\n")
    with pytest.raises(ConfigError, match="candidate_top_k: expected an integer"):
        load_rollout_matching(tmp_path / "type.yaml")


@pytest.mark.parametrize("body, needle", [
    ("maskiou_gat: 0.5", "did you mean 'maskiou_gate'"),
    ("maskiou_gate: 1.5", "maskiou_gate must be in [0, 1]"),
    ("ot_epsilon: 0", "ot_epsilon must be"),
])
def test_bad_config_exits_2_before_any_work(model_dir, tmp_path, capsys, body, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("custom:\n  extra:\n    rollout_matching:\n      " + body + "\n")
    rc, out, err = run_main(model_dir, tmp_path, [GATE_LINE], capsys, config=cfg)
    assert rc == 2 and not out.exists()
    (line,) = err.strip().splitlines()
    assert str(cfg) in line and needle in line


# ---------------------------------------------------------------------------------- bad input


GOOD = {"id": "ok", "response_text": "{}", "objects": []}
BAD_LINES = [
    ('{"id": "x", "response_text": ', "malformed JSON"),
    ('[1, 2]', "must be a JSON object"),
    ({"response_text": "{}", "objects": []}, 'missing "id"'),
    ({"id": 7, "response_text": "{}", "objects": []}, '"id" must be a string'),
    ({"id": "x", "response_text": "{}", "response_token_ids": [1], "objects": []}, "found both"),
    ({"id": "x", "objects": []}, "found neither"),
    ({"id": "x", "response_token_ids": [1, 2.5], "objects": []}, '"response_token_ids"[1] = 2.5'),
    ({"id": "x", "response_token_ids": [1, "2"], "objects": []}, "is not a token id"),
    ({"id": "x", "response_token_ids": [True], "objects": []}, "is not a token id"),
    ({"id": "x", "response_token_ids": [-1], "objects": []}, "is not a token id"),
    ({"id": "x", "response_token_ids": "1 2", "objects": []}, "must be a list of token ids"),
    ({"id": "x", "response_text": 5, "objects": []}, '"response_text" must be a string'),
    ({"id": "x", "response_text": "{}"}, 'needs an "objects" list'),
    ({"id": "x", "response_text": "{}", "objects": [{"desc": "", "bbox_2d": [1, 2, 3, 4]}]}, "objects[0]: 'desc' must be a non-empty string"),
    ({"id": "x", "response_text": "{}", "objects": [{"desc": "a", "poly": [1, 2, 3, 4, 5]}]}, "'poly' needs an even number"),
    ({"id": "x", "response_text": "{}", "objects": [{"desc": "a", "bbox_2d": [1, 2, 3, 1000]}]}, "not ints 0..999"),
    ({"id": "x", "response_text": "{}", "objects": [{"desc": "a", "bbox_2d": [10, 2, 5, 40]}]}, "need x2 > x1"),
    ({"id": "x", "response_text": "{}", "objects": [{"desc": "a", "bbox_2d": [1, 2, 3, 4], "poly": [1, 2, 3, 4, 5, 6]}]}, "exactly one geometry"),
    ({"id": "x", "response_text": "{}", "objects": [{"desc": "a", "box": [1, 2, 3, 4]}]}, "unknown object key(s) ['box']"),
    ({"id": "x", "response_text": "{}", "objects": [{"desc": "a", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_1000|>"]}]}, "is not a coord token"),
]


@pytest.mark.parametrize("bad, needle", BAD_LINES, ids=[n for _, n in BAD_LINES])
def test_bad_line_exits_2_naming_the_line_without_output(model_dir, tmp_path, capsys, bad, needle):
    rc, out, err = run_main(model_dir, tmp_path, [GOOD, bad, GOOD], capsys)
    assert rc == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and f"{tmp_path / 'in.jsonl'}:2:" in line and needle in line
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no OUT, no temp file left


def test_non_utf8_line_exits_2(model_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "\xff"}\n')
    rc = main(["--model", str(model_dir), "--rollouts", str(src), "--out", str(tmp_path / "out.jsonl")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and f"{src}:2: not UTF-8" in line and not (tmp_path / "out.jsonl").exists()


def test_bad_model_dir_or_paths_exit_2(tmp_path, capsys, model_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text('{"model_type": "qwen3_vl"}')
    cases = [
        (["--model", str(tmp_path / "missing"), "--rollouts", str(src), "--out", str(tmp_path / "o.jsonl")], "not a directory"),
        (["--model", str(tmp_path / "cfg_only"), "--rollouts", str(src), "--out", str(tmp_path / "o.jsonl")], "no tokenizer files"),
        (["--model", str(model_dir), "--rollouts", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.jsonl")], "file not found"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert needle in line
    assert not (tmp_path / "o.jsonl").exists()
    assert main(["--model", str(model_dir), "--rollouts", str(src), "--out", str(tmp_path / "new" / "o.jsonl")]) == 0
    assert (tmp_path / "new" / "o.jsonl").is_file()  # a missing output folder is created


def test_tokenizer_without_coord_tokens_gets_them_appended(tmp_path, capsys, token_table):
    from src.models.tokenizer import build_qwen_tokenizer

    build_qwen_tokenizer(with_coord_tokens=False).save_pretrained(tmp_path / "plain")
    table = load_token_table(tmp_path / "plain")
    assert table.coord_ids.tolist() == token_table.coord_ids.tolist()  # appended after the 151,669 ids
    records, _ = records_and_counters(*run_main(tmp_path / "plain", tmp_path, [GATE_LINE], capsys))
    assert records[0]["matches"] == [[0, 0]]


# ----------------------------------------------------------------------------------- at scale


def generated_lines(table, n: int, seed: int = 0):
    """``n`` rollouts: GT of 0-12 objects (bbox / poly), predictions = jittered GT, dropped ones,
    duplicates and hallucinations; some truncated; token ids or text."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        gts = []
        for _ in range(rng.randint(0, 12)):
            x, y, w, h = rng.randint(0, 850), rng.randint(0, 850), rng.randint(8, 140), rng.randint(8, 140)
            if rng.random() < 0.7:
                gts.append(DetObject(f"obj {rng.randint(0, 9)}", "bbox_2d", (x, y, x + w, y + h)))
            else:
                gts.append(DetObject(f"shape {rng.randint(0, 9)}", "poly", (x, y, x + w, y, x + w // 2, y + h)))
        preds = []
        for g in gts:
            if rng.random() < 0.85:
                preds.append(DetObject(g.desc, g.geometry, tuple(min(999, max(0, b + rng.randint(-4, 4))) for b in g.bins)))
                if rng.random() < 0.15:
                    preds.append(preds[-1])
        if rng.random() < 0.3:
            preds.append(DetObject("ghost", "bbox_2d", (900, 900, 990, 990)))
        text = serialize_objects(preds)
        if rng.random() < 0.15:
            text = text[: rng.randint(0, len(text))]
        line = {"id": f"r{i:04d}", "objects": gt_json(gts, as_tokens=rng.random() < 0.5)}
        if i % 2:
            line["response_text"] = text
        else:
            line["response_token_ids"] = table.encode(text) + [table.im_end_id]
        lines.append(line)
    return lines


def test_several_hundred_rollouts(model_dir, tmp_path, capsys, token_table):
    lines = generated_lines(token_table, 300)
    records, c = records_and_counters(*run_main(model_dir, tmp_path, lines, capsys))
    assert [r["id"] for r in records] == [ln["id"] for ln in lines]
    assert c["samples"] == 300 and c["rollout/gt_objects"] == sum(len(ln["objects"]) for ln in lines)
    assert c["rollout/parse_truncated"] > 0 and 0.5 < c["rollout/match_rate"] <= 1.0
    assert all(r["y_train_text"].endswith("}<|im_end|>") for r in records)


def test_cli_subprocess(model_dir, tmp_path, token_table):
    src = write_jsonl(tmp_path / "in.jsonl", sample_lines(token_table))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "src.replay", "--model", str(model_dir), "--rollouts", str(src), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    counters = json.loads(proc.stderr.strip().splitlines()[-1])
    assert set(counters) == COUNTER_KEYS and counters["samples"] == 7
    assert len(out.read_text(encoding="utf-8").splitlines()) == 7


# ---------------------------------------------------------------------- train -> replay, end to end


@pytest.mark.slow
def test_train_then_replay_reproduces_the_logged_matches_and_y_train(tiny_model_dirs, tmp_path, monkeypatch):
    """README workflow: a stage-2 run writes ``rollouts.jsonl``; ``src.replay --rollouts <run>/rollouts.jsonl
    --config <run>/resolved_config.yaml`` reads that file as it is and reproduces, line by line, the matches,
    FP, FN count and Y_train training logged. The tiny random model emits no valid object, so its rollouts
    are replaced by plausible ones (GT shifted by a few bins, a spurious object, a cut mid-answer) to give
    the matcher and the prefix real work; everything after generation is the trainer's own code."""
    from src.config.loader import config_from_dict
    from src.data.contract import load_jsonl
    from src.data.images import load_image
    from src.data.make_shapes import make_shapes
    from src.data.prompt import prompt_text
    from src.models.loading import load_model_and_processor
    from src.sft import run
    from src.rollout.encoding import encode_prompt
    from src.rollout.hf import HFEngine
    from tests.test_trainers import fake_rollout

    make_shapes(tmp_path / "shapes", num_train=8, num_val=2, seed=4, image_size=64, min_shapes=1, max_shapes=3, kinds=("rectangle", "triangle"))
    train_jsonl = tmp_path / "shapes" / "train.jsonl"
    _, processor = load_model_and_processor(tiny_model_dirs["qwen3_vl"])
    prompt = prompt_text(processor)
    def key(p):  # the image, not the prompt ids (the same for every image of one size)
        return p.pixel_values.numpy().tobytes()

    by_prompt = {key(encode_prompt(processor, load_image(r.image), prompt)): r for r in load_jsonl(train_jsonl)[0]}
    table = load_token_table(tiny_model_dirs["qwen3_vl"])

    def plausible(record, k: int) -> list[int]:
        preds = [DetObject(o.desc, o.geometry, tuple(min(max(b + 3 * (-1) ** i, 0), 999) for i, b in enumerate(o.bins))) for o in record.objects]
        preds.append(DetObject("ghost", "bbox_2d", (10, 10, 40, 40)))
        ids = table.encode(serialize_objects(preds)) + [table.im_end_id]
        return ids[: len(ids) * 2 // 3] if k % 2 else ids  # every other rollout cut mid-answer

    def fake_generate(self, model, prompts, synced_gpus=False):
        return [fake_rollout(p, plausible(by_prompt[key(p)], k)) for k, p in enumerate(prompts)]

    monkeypatch.setattr(HFEngine, "generate", fake_generate)
    out = tmp_path / "run"
    cfg = config_from_dict({
        "model": {"model_name_or_path": str(tiny_model_dirs["qwen3_vl"])},
        "custom": {"trainer_variant": "rollout_matching_sft", "train_jsonl": str(train_jsonl),
                   "extra": {"rollout_matching": {"log_rollout_samples": 4, "maskiou_gate": 0.5}}},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2,
                     "logging_steps": 1, "save_strategy": "no", "report_to": [], "learning_rate": 1e-4},
    })
    run(cfg)
    logged = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(logged) == 8 and sum(len(s["matches"]) for s in logged) >= 4 and any(s["truncated"] for s in logged)

    replayed = out / "replay.jsonl"
    assert main(["--model", str(out), "--rollouts", str(out / "rollouts.jsonl"), "--config", str(out / "resolved_config.yaml"),
                 "--out", str(replayed)]) == 0
    lines = [json.loads(line) for line in replayed.read_text().splitlines()]
    assert [r["id"] for r in lines] == [s["id"] for s in logged]
    for s, r in zip(logged, lines):
        assert r["matches"] == s["matches"] and r["fp"] == s["fp"] and r["fn_appended"] == s["fn_appended"], s["id"]
        assert r["y_train_text"] == s["y_train"], s["id"]
        assert r["truncated"] == s["truncated"] and r["dropped_invalid"] == s["dropped_invalid"]
        assert [o["bins"] for o in r["valid_objects"]] == [o["bins"] for o in s["valid_objects"]]
