"""Config: extends/merge, strict typed validation, one-line errors, every shipped YAML validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src.config.loader import ConfigError, config_from_dict, gradient_accumulation_for, load_config, merge
from src.config.schema import RolloutMatchingConfig

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"model_name_or_path": "m"}, "custom": {"train_jsonl": "t.jsonl"}}


def cfg_with(extra: dict):
    return config_from_dict(merge(MINIMAL, extra))


def write(p: Path, data: dict) -> Path:
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_validates(path):
    cfg = load_config(path)
    assert cfg.model.model_name_or_path and cfg.custom.train_jsonl


def test_defaults_match_spec_section_12():
    rm = RolloutMatchingConfig()
    assert (rm.decode_mode, rm.temperature, rm.candidate_top_k, rm.maskiou_gate, rm.maskiou_resolution) == ("greedy", 0.0, 5, 0.3, 256)
    assert (rm.fp_cost, rm.fn_cost, rm.ot_cost, rm.ot_epsilon, rm.ot_iters) == (0.5, 2.0, "l2", 10.0, 30)
    c = cfg_with({}).custom.coord_soft_ce_w1
    assert (c.target_sigma, c.soft_ce_weight, c.w1_weight, c.gate_weight) == (2.0, 1.0, 1.0, 1.0)


def test_extends_chain_merges_recursively_and_replaces_lists(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    write(tmp_path / "base.yaml", {**MINIMAL, "training": {"report_to": ["tensorboard"], "learning_rate": 1e-4},
                                   "custom": {"train_jsonl": "t.jsonl", "extra": {"rollout_matching": {"maskiou_gate": 0.4, "fp_cost": 0.7}}}})
    write(sub / "child.yaml", {"extends": "../base.yaml", "training": {"report_to": []},
                               "custom": {"extra": {"rollout_matching": {"maskiou_gate": 0.5}}}})
    cfg = load_config(sub / "child.yaml")
    assert cfg.rollout_matching.maskiou_gate == 0.5 and cfg.rollout_matching.fp_cost == 0.7  # recursive merge
    assert cfg.training.args["report_to"] == [] and cfg.training.args["learning_rate"] == 1e-4  # list replaced
    assert [Path(s).name for s in cfg.sources] == ["base.yaml", "child.yaml"]


def test_extends_list_and_base_config(tmp_path):
    write(tmp_path / "a.yaml", {"training": {"learning_rate": 1.0}})
    write(tmp_path / "b.yaml", {"training": {"learning_rate": 2.0, "seed": 7}})
    write(tmp_path / "c.yaml", {**MINIMAL, "extends": ["a.yaml", "b.yaml"]})
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.training.args["learning_rate"] == 2.0 and cfg.training.args["seed"] == 7
    write(tmp_path / "base.yaml", {"training": {"seed": 3, "learning_rate": 9.0}})
    cfg = load_config(tmp_path / "c.yaml", tmp_path / "base.yaml")
    assert cfg.training.args["seed"] == 7  # --config overrides --base_config


def test_extends_cycle_rejected(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"custom": {"extra": {"rollout_matching": {"maskiou_gat": 0.3}}}}, "custom.extra.rollout_matching.maskiou_gat: unknown key (did you mean 'maskiou_gate'?)"),
        ({"training": {"learnig_rate": 1e-3}}, "training.learnig_rate: unknown key (not a transformers.TrainingArguments field) (did you mean 'learning_rate'?)"),
        ({"modle": {}}, "modle: unknown top-level key (did you mean 'model'?)"),
        ({"training": {"bf16": "yes"}}, "training.bf16: expected true/false, got 'yes'"),
        ({"training": {"per_device_train_batch_size": 1.5}}, "training.per_device_train_batch_size: expected an integer"),
        ({"custom": {"extra": {"rollout_matching": {"max_new_tokens": "many"}}}}, "custom.extra.rollout_matching.max_new_tokens: expected an integer"),
        ({"custom": {"trainer_variant": "rollout_matching"}}, "did you mean 'rollout_matching_sft'?"),
        ({"custom": {"coord_soft_ce_w1": {"target_sigma": -1.0}}}, "custom.coord_soft_ce_w1.target_sigma"),
        ({"custom": {"extra": {"rollout_matching": {"decode_mode": "sample"}}}}, "decode_mode: sample needs temperature > 0"),
        ({"custom": {"extra": {"rollout_matching": {"decode_mode": "beam"}}}}, "num_beams: decode_mode: beam needs num_beams >= 2"),
        ({"custom": {"extra": {"rollout_matching": {"maskiou_gate": 1.5}}}}, "maskiou_gate: must be in [0, 1]"),
        ({"training": {"packing": True}, "custom": {"trainer_variant": "rollout_matching_sft"}}, "training.packing: true is not supported with custom.trainer_variant: rollout_matching_sft"),
        ({"training": {"remove_unused_columns": True}}, "training.remove_unused_columns: must be false"),
        ({"training": {"effective_batch_size": 8, "gradient_accumulation_steps": 2}}, "set either effective_batch_size or gradient_accumulation_steps"),
        ({"model": {"model_name_or_path": None}}, "model.model_name_or_path: required"),
    ],
)
def test_bad_configs_give_one_line_naming_the_key(extra, message):
    with pytest.raises(ConfigError) as e:
        cfg_with(extra)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_effective_batch_size_sets_accumulation():
    cfg = cfg_with({"training": {"effective_batch_size": 16, "per_device_train_batch_size": 2}})
    assert gradient_accumulation_for(cfg, world_size=1) == 8
    assert gradient_accumulation_for(cfg, world_size=4) == 2
    with pytest.raises(ConfigError, match="not a multiple"):
        gradient_accumulation_for(cfg, world_size=3)


def test_config_objects_are_frozen():
    cfg = cfg_with({})
    with pytest.raises(Exception):
        cfg.custom.train_jsonl = "x"  # type: ignore[misc]


def test_cli_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = write(tmp_path / "bad.yaml", merge(MINIMAL, {"custom": {"extra": {"rollout_matching": {"candidate_topk": 5}}}}))
    r = subprocess.run([sys.executable, "-m", "src.sft", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "custom.extra.rollout_matching.candidate_topk: unknown key (did you mean 'candidate_top_k'?)" in lines[0]


def test_cli_print_config_validates_without_loading_a_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "src.sft", "--config", "configs/demo/stage1_shapes.yaml", "--print_config"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["custom"]["trainer_variant"] == "sft"
    assert printed["custom"]["extra"]["rollout_matching"]["candidate_top_k"] == 5


def test_config_reference_is_current():
    from src.config.docs import render

    assert (ROOT / "docs" / "config.md").read_text() == render(), "run: python -m src.config.docs > docs/config.md"


def test_extending_the_demo_with_your_own_data_just_works(tmp_path):
    """A config that extends the demo (which sets custom.shapes_data) and names its own train/val files
    loads, and the generator leaves those files alone; a missing file the generator cannot own is one
    line naming the fix (custom.shapes_data: null)."""
    from src.sft import shapes_to_generate

    (tmp_path / "data").mkdir()
    for name in ("coco_train.jsonl", "coco_val.jsonl"):
        (tmp_path / "data" / name).write_text("")
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({
        "extends": str(ROOT / "configs" / "demo" / "stage1_shapes.yaml"),
        "custom": {"train_jsonl": str(tmp_path / "data" / "coco_train.jsonl"), "val_jsonl": str(tmp_path / "data" / "coco_val.jsonl")},
    }))
    cfg = load_config(own)
    assert cfg.custom.shapes_data is not None and shapes_to_generate(cfg) is None

    (tmp_path / "data" / "coco_val.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"coco_val.jsonl does not exist, and the shapes generator only writes DIR/train.jsonl .*"
                                          r"set custom.shapes_data: null to use your own data"):
        shapes_to_generate(load_config(own))

    gen = tmp_path / "gen"  # the generator's own layout: generated when absent ...
    cfg = config_from_dict({"model": {"model_name_or_path": "m"}, "custom": {
        "train_jsonl": str(gen / "train.jsonl"), "val_jsonl": str(gen / "val.jsonl"), "shapes_data": {"num_train": 2}}})
    assert shapes_to_generate(cfg) == gen
    gen.mkdir()
    (gen / "notes.txt").write_text("mine")  # ... but never into a folder holding other files
    with pytest.raises(ConfigError, match="holds other files .notes.txt.; the shapes generator only fills a folder of its own"):
        shapes_to_generate(cfg)


# ---------------------------------------------------------------------------- command-line overrides


def test_overrides_are_typed_and_validated_like_yaml_keys():
    from src.config.loader import parse_override

    cfg = load_config(ROOT / "configs/smoke/sft_tiny.yaml", overrides=[
        "training.learning_rate=3e-5", "custom.extra.rollout_matching.max_new_tokens=2048", "training.report_to=[]",
        "custom.val_jsonl=null", "model.lora.enabled=true", "custom.shapes_data.kinds=[rectangle, ellipse]",
        "training.learning_rate=4e-5",  # later wins
    ])
    assert cfg.training.args["learning_rate"] == 4e-5 and isinstance(cfg.training.args["learning_rate"], float)
    assert cfg.rollout_matching.max_new_tokens == 2048 and cfg.training.args["report_to"] == []
    assert cfg.custom.val_jsonl is None and cfg.model.lora.enabled is True
    assert cfg.custom.shapes_data.kinds == ("rectangle", "ellipse")
    assert cfg.overrides[0] == "training.learning_rate=3e-5" and len(cfg.overrides) == 7
    assert parse_override('training.output_dir="1e3"') == (["training", "output_dir"], "1e3")  # quoted (shell: '"1e3"'): a string
    assert parse_override("training.output_dir=a=b") == (["training", "output_dir"], "a=b")


@pytest.mark.parametrize("override, message", [
    ("training.learning_rat=3e-5", "command-line override training.learning_rat=3e-5: training.learning_rat: unknown key "
                                   "(not a transformers.TrainingArguments field) (did you mean 'learning_rate'?)"),
    ("custom.extra.rollout_matching.max_new_tokens=many", "command-line override custom.extra.rollout_matching.max_new_tokens=many: "
                                                         "custom.extra.rollout_matching.max_new_tokens: expected an integer, got 'many'"),
    ("custom.extra.rollout_matching.candidate_topk=3", "(did you mean 'candidate_top_k'?)"),
    ("learning_rate", "override 'learning_rate': expected section.key=value"),
    ("training.seed=[1, ", "the value is not valid YAML"),
])
def test_bad_overrides_stop_with_one_line_naming_them(override, message, capsys):
    from src.sft import main

    assert main(["--config", str(ROOT / "configs/smoke/sft_tiny.yaml"), override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_bad_override_through_the_real_command_line():
    r = subprocess.run([sys.executable, "-m", "src.sft", "--config", "configs/smoke/sft_tiny.yaml", "training.learning_rat=3e-5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: command-line override training.learning_rat=3e-5: training.learning_rat: unknown key "
                                             "(not a transformers.TrainingArguments field) (did you mean 'learning_rate'?)"]


def test_print_config_and_resolved_config_show_the_overrides(tmp_path):
    """--print_config prints the result; a run writes it to resolved_config.yaml with the overrides named,
    so the run is reproducible from its directory alone."""
    r = subprocess.run([sys.executable, "-m", "src.sft", "--config", "configs/demo/stage1_shapes.yaml", "--print_config",
                        "training.learning_rate=3e-5", "custom.extra.rollout_matching.max_new_tokens=77"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["training"]["learning_rate"] == 3e-5 and printed["custom"]["extra"]["rollout_matching"]["max_new_tokens"] == 77

    from src.sft import write_run_files

    cfg = load_config(ROOT / "configs/smoke/sft_tiny.yaml", overrides=["training.learning_rate=3e-5", "training.seed=7"])
    write_run_files(cfg, tmp_path)
    text = (tmp_path / "resolved_config.yaml").read_text()
    assert "# command-line overrides (applied last): training.learning_rate=3e-5 training.seed=7" in text
    again = load_config(tmp_path / "resolved_config.yaml")  # the resolved file alone reproduces the run's config
    assert again.training.args["learning_rate"] == 3e-5 and again.training.args["seed"] == 7
