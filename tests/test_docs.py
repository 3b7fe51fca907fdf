"""Docs and OpenSpec specs match the code.

* every config key named in docs/*.md and openspec/**/*.md exists in the typed config;
* every metric name named there is one the code can log, and every metric the code logs is in
  docs/metrics.md (names collected by calling the code on zero sums, not by reading its source);
* every ``Test: tests/<file>.py::<name>`` cited by a spec scenario exists;
* ``openspec validate --all --strict`` passes, and fails once a requirement loses its scenarios.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import typing
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPENSPEC_BIN = ROOT / "node_modules" / ".bin" / "openspec"
NO_OPENSPEC = "OpenSpec CLI not installed (node_modules/.bin/openspec missing; run `npm ci` — CI installs it)"
ENV = {**os.environ, "OPENSPEC_TELEMETRY": "0", "NO_COLOR": "1"}


def doc_files() -> list[Path]:
    return sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "openspec").rglob("*.md"))


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# ------------------------------------------------------------------------------------- config keys

CONFIG_KEY_RE = re.compile(r"`((?:model|custom|training)\.[A-Za-z_][A-Za-z0-9_.]*(?:\.\*)?)")


def _walk(cls: type, prefix: str, out: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        tp = hints[f.name]
        nested = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        out.add(key)
        if nested:
            _walk(nested[0], key, out)


@lru_cache(maxsize=1)
def config_keys() -> frozenset[str]:
    from transformers import TrainingArguments

    from src.config.schema import TRAINING_DEFAULTS, CustomConfig, ModelConfig, TrainingConfig

    keys: set[str] = set()
    _walk(ModelConfig, "model", keys)
    _walk(CustomConfig, "custom", keys)
    keys |= {f"training.{f.name}" for f in dataclasses.fields(TrainingConfig) if f.name != "args"}
    keys |= {f"training.{k}" for k in TRAINING_DEFAULTS}
    keys |= {f"training.{f.name}" for f in dataclasses.fields(TrainingArguments)}
    return frozenset(keys | {"model", "custom", "training"})


def mentioned_config_keys() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for p in doc_files():
        for m in CONFIG_KEY_RE.finditer(p.read_text(encoding="utf-8")):
            key = m.group(1).rstrip(".")
            key = key[:-2] if key.endswith(".*") else key
            found.setdefault(key, set()).add(rel(p))
    return found


def test_every_documented_config_key_exists():
    found = mentioned_config_keys()
    assert len(found) > 30, "the key pattern found suspiciously few keys"
    unknown = {k: sorted(v) for k, v in found.items() if k not in config_keys()}
    assert not unknown, f"config keys named in docs/specs but not in src/config/schema.py: {unknown}"


# ------------------------------------------------------------------------------------------ metrics

METRIC_RE = re.compile(r"`((?:loss|rollout|coord|tokens|time)/[A-Za-z0-9_/]+|eval_rollout_[A-Za-z0-9_]+)`")


@lru_cache(maxsize=1)
def logged_metrics() -> frozenset[str]:
    """Every metric name the trainers and the evaluation can log (calling the code on zero sums)."""
    from src.rollout_matching.stats import DetectionCounts
    from src.trainers.base import LOSS_SUM_KEYS, DetectionTrainer
    from src.trainers.rollout_matching import ROLLOUT_SUM_KEYS, RolloutMatchingSFTTrainer

    sums = dict.fromkeys((*LOSS_SUM_KEYS, "samples", *ROLLOUT_SUM_KEYS), 0.0)
    names = set(DetectionTrainer.derive_metrics(object.__new__(DetectionTrainer), sums))
    names |= set(RolloutMatchingSFTTrainer.derive_metrics(object.__new__(RolloutMatchingSFTTrainer), sums))
    names |= set(DetectionCounts().metrics(prefix="eval_"))
    return frozenset(names)


def mentioned_metrics(paths: list[Path]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for p in paths:
        for m in METRIC_RE.finditer(p.read_text(encoding="utf-8")):
            found.setdefault(m.group(1), set()).add(rel(p))
    return found


def test_every_documented_metric_is_logged_by_the_code():
    found = mentioned_metrics(doc_files())
    unknown = {k: sorted(v) for k, v in found.items() if k not in logged_metrics()}
    assert not unknown, f"metric names in docs/specs that the code never logs: {unknown}"


def test_every_logged_metric_is_documented():
    documented = set(mentioned_metrics([ROOT / "docs" / "metrics.md"]))
    missing = sorted(logged_metrics() - documented)
    assert not missing, f"metrics the code logs but docs/metrics.md does not describe: {missing}"
    assert "rollout/new_tokens" not in logged_metrics()  # raw sums are not logged; their means are


def test_evaluation_formulas_match_metrics_doc():
    """docs/metrics.md: precision = matched / predicted, recall = matched / GT, F1 = harmonic mean."""
    from src.rollout_matching.stats import DetectionCounts

    m = DetectionCounts(images=2, pred_objects=4, gt_objects=6, matched=3, parse_valid=1,
                        images_with_valid_object=2, truncated=1, dropped_invalid=5).metrics(prefix="eval_")
    assert m["eval_rollout_precision"] == pytest.approx(0.75) and m["eval_rollout_recall"] == pytest.approx(0.5)
    assert m["eval_rollout_f1"] == pytest.approx(0.6)
    assert (m["eval_rollout_parse_valid_rate"], m["eval_rollout_nonempty_rate"], m["eval_rollout_truncated_rate"]) == (0.5, 1.0, 0.5)
    assert (m["eval_rollout_valid_objects_per_image"], m["eval_rollout_dropped_invalid"], m["eval_rollout_images"]) == (2.0, 5, 2)
    zero = DetectionCounts().metrics(prefix="eval_")
    assert all(v == 0 for v in zero.values())


# ------------------------------------------------------------------------------- cited tests exist

CITED_TEST_RE = re.compile(r"Test: (tests/[\w/]+\.py)::(\w+)")


def test_every_scenario_cites_an_existing_test():
    specs = sorted((ROOT / "openspec").rglob("spec.md"))
    assert len(specs) >= 6
    missing = []
    for p in specs:
        text = p.read_text(encoding="utf-8")
        for block in re.split(r"^#### Scenario:", text, flags=re.M)[1:]:
            block = re.split(r"^###? ", block, flags=re.M)[0]
            cites = CITED_TEST_RE.findall(block)
            if not cites:
                missing.append(f"{rel(p)}: scenario {block.splitlines()[0].strip()!r} names no test")
            for file, name in cites:
                src = ROOT / file
                if not src.exists() or not re.search(rf"^def {name}\(", src.read_text(encoding="utf-8"), flags=re.M):
                    missing.append(f"{rel(p)}: {file}::{name} does not exist")
    assert not missing, "\n".join(missing)


# ------------------------------------------------------------------------------ openspec validate


def run_openspec(args: list[str], cwd: Path, npx: bool) -> subprocess.CompletedProcess:
    cmd = ["npx", "--no-install", "openspec", *args] if npx else [str(OPENSPEC_BIN), *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not OPENSPEC_BIN.exists(), reason=NO_OPENSPEC)
def test_openspec_validate_all_strict():
    if shutil.which("npx") is None:
        pytest.skip("npx not on PATH")
    r = run_openspec(["validate", "--all", "--strict", "--no-interactive"], ROOT, npx=True)
    assert r.returncode == 0, f"openspec validate --all --strict failed:\n{r.stdout}\n{r.stderr}"
    assert "0 failed" in r.stdout + r.stderr


@pytest.mark.skipif(not OPENSPEC_BIN.exists(), reason=NO_OPENSPEC)
def test_removing_a_scenario_fails_validation(tmp_path):
    shutil.copytree(ROOT / "openspec", tmp_path / "openspec")
    spec = tmp_path / "openspec" / "specs" / "evaluation" / "spec.md"
    text = spec.read_text(encoding="utf-8")
    # the first requirement loses every "#### Scenario:" block (up to the next requirement)
    head, first, rest = re.split(r"(?=^### Requirement:)", text, maxsplit=2, flags=re.M)
    stripped = first.split("#### Scenario:")[0]
    assert stripped != first
    spec.write_text(head + stripped + rest, encoding="utf-8")
    r = run_openspec(["validate", "--all", "--strict", "--no-interactive"], tmp_path, npx=False)
    assert r.returncode != 0, f"validation passed without scenarios:\n{r.stdout}\n{r.stderr}"
    assert "scenario" in (r.stdout + r.stderr).lower()


# ----------------------------------------------------------------------- the project speaks of itself


MACHINE_PATH_RE = re.compile(r"(?<![\w.])/(?:work|root|home|Users|mnt|tmp/pytest)/[\w.-]+")


def test_project_files_name_no_machine_paths():
    """Tracked text files (code, docs, specs, configs) never name a path of the machine they were written on."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in tracked:
        if not name.endswith((".py", ".md", ".yaml", ".yml", ".json", ".toml", ".txt")) or name == "package-lock.json":
            continue
        for n, line in enumerate((ROOT / name).read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if MACHINE_PATH_RE.search(line) and "MACHINE_PATH_RE" not in line:
                hits.append(f"{name}:{n}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)
