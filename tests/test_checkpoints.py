"""Checkpoints that survive a kill, and one output directory per run (reliability issue, items 4-5).

* A checkpoint is written aside (``.checkpoint-N.partial``) and renamed once complete; a SIGTERM during a
  save leaves no ``checkpoint-N``; ``resume_from_checkpoint: true`` picks the newest COMPLETE one; a named
  incomplete checkpoint is refused with one line before anything loads.
* A fresh run into a non-empty output directory stops with one line unless the user says
  ``training.overwrite_output_dir: true`` (the previous run's checkpoints and logs are then removed) or
  resumes. ``rollouts.jsonl`` starts anew in a fresh run and is continued by a resumed one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from src.config.loader import ConfigError, config_from_dict
from tests.test_end_to_end import ROOT, run, train_logs


def touch_checkpoint(path: Path, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    return path


def cfg_for(out: Path, **training) -> object:
    return config_from_dict({"model": {"model_name_or_path": "m"}, "custom": {"train_jsonl": "t.jsonl"},
                             "training": {"output_dir": str(out), "report_to": [], **training}})


# ------------------------------------------------------------------------------------ unit level


def test_completeness_and_the_newest_complete_checkpoint(tmp_path):
    from src.trainers.checkpoint import missing_parts, newest_complete

    touch_checkpoint(tmp_path / "checkpoint-2")
    touch_checkpoint(tmp_path / "checkpoint-10")
    touch_checkpoint(tmp_path / "checkpoint-12", complete=False)
    touch_checkpoint(tmp_path / ".checkpoint-14.partial", complete=False)
    (tmp_path / "checkpoint-3").mkdir()  # nothing in it
    assert missing_parts(tmp_path / "checkpoint-10") == []
    assert missing_parts(tmp_path / "checkpoint-12") == ["trainer_state.json"]
    assert missing_parts(tmp_path / "checkpoint-3") == ["trainer_state.json", "model weights (model.safetensors / model.safetensors.index.json)"]
    best, skipped = newest_complete(tmp_path)
    assert best == tmp_path / "checkpoint-10"  # numeric order, not string order; the partial and 12 skipped
    assert skipped == [tmp_path / "checkpoint-12"]
    assert newest_complete(tmp_path / "absent") == (None, [])


def test_publish_renames_and_replaces_an_earlier_save_of_the_same_step(tmp_path):
    from src.trainers.checkpoint import publish, staging_dir

    final = tmp_path / "checkpoint-4"
    touch_checkpoint(final)
    (final / "old.txt").write_text("old")
    staging = touch_checkpoint(staging_dir(final))
    assert staging.name == ".checkpoint-4.partial"
    publish(staging, final)
    assert not staging.exists() and (final / "trainer_state.json").exists() and not (final / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_run_dir_policy(tmp_path):
    from src.sft import resolve_run_dir

    out = tmp_path / "run"
    assert resolve_run_dir(cfg_for(out)) is None  # absent: a fresh run
    out.mkdir()
    assert resolve_run_dir(cfg_for(out)) is None  # empty: a fresh run
    touch_checkpoint(out / "checkpoint-2")
    touch_checkpoint(out / "checkpoint-4", complete=False)
    with pytest.raises(ConfigError, match=r"training.output_dir: .* already holds another run \(checkpoint-2, checkpoint-4\); "
                                          r"set training.resume_from_checkpoint: true"):
        resolve_run_dir(cfg_for(out))
    assert resolve_run_dir(cfg_for(out, overwrite_output_dir=True)) is None
    assert resolve_run_dir(cfg_for(out, resume_from_checkpoint=True)) == str(out / "checkpoint-2")
    assert resolve_run_dir(cfg_for(out, resume_from_checkpoint=str(out / "checkpoint-2"))) == str(out / "checkpoint-2")
    with pytest.raises(ConfigError, match=r"checkpoint-4 is not a complete checkpoint \(missing trainer_state.json\)"):
        resolve_run_dir(cfg_for(out, resume_from_checkpoint=str(out / "checkpoint-4")))
    with pytest.raises(ConfigError, match="holds no complete checkpoint-N"):
        resolve_run_dir(cfg_for(tmp_path / "empty", resume_from_checkpoint=True))
    with pytest.raises(ConfigError, match="set only one of them"):
        cfg_for(out, resume_from_checkpoint=True, overwrite_output_dir=True)


def test_overwrite_removes_the_previous_runs_checkpoints_and_logs_only(tmp_path):
    from src.sft import clear_previous_run

    touch_checkpoint(tmp_path / "checkpoint-2")
    touch_checkpoint(tmp_path / ".checkpoint-4.partial", complete=False)
    for name in ("trainer_state.json", "summary.json", "rollouts.jsonl", "notes.txt", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    removed = clear_previous_run(tmp_path)
    assert sorted(removed) == [".checkpoint-4.partial", "checkpoint-2", "rollouts.jsonl", "summary.json", "trainer_state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.txt"]


def test_trim_rollout_log_keeps_lines_up_to_the_checkpoint(tmp_path):
    from src.trainers.rollout_matching import trim_rollout_log

    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps({"step": s, "id": i}) + "\n" for i, s in enumerate([1, 1, 2, 3, 3, 4])))
    assert trim_rollout_log(path, 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 1, 2]
    assert trim_rollout_log(tmp_path / "absent.jsonl", 2) == 0


# --------------------------------------------------------------------------------- end to end

KILL_LAUNCHER = '''
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from src.trainers.base import DetectionTrainer

_save_rng = DetectionTrainer._save_rng_state

def _slow_save(self, output_dir):
    _save_rng(self, output_dir)
    if self.state.global_step == 4:  # the model and optimizer of step 4 are written: signal, then hang
        Path({marker!r}).write_text(output_dir)
        time.sleep(300)

DetectionTrainer._save_rng_state = _slow_save
from src.sft import main
raise SystemExit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def run_assets(tmp_path_factory, tiny_model_dirs):
    from src.data.make_shapes import make_shapes

    root = tmp_path_factory.mktemp("ckpt")
    make_shapes(root / "shapes", num_train=8, num_val=2, seed=3, image_size=64, min_shapes=1, max_shapes=2, kinds=("rectangle",))
    return {"root": root, "model": tiny_model_dirs["qwen3_vl"]}


def stage2_config(assets, name: str, out: Path, **training) -> Path:
    cfg = {
        "extends": str(ROOT / "configs" / "smoke" / "rollout_matching_tiny.yaml"),
        "model": {"model_name_or_path": str(assets["model"]), "build_tiny": None},
        "custom": {"train_jsonl": str(assets["root"] / "shapes" / "train.jsonl"), "val_jsonl": None, "shapes_data": None},
        "training": {"output_dir": str(out), "report_to": [], "overwrite_output_dir": False, "per_device_train_batch_size": 2,
                     "max_steps": 4, "save_strategy": "steps", "save_steps": 2, **training},
    }
    path = assets["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def sft(config: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "src.sft", "--config", str(config)]
    if check:
        return run(cmd)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def rollout_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "rollouts.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_during_a_save_then_resume_true_continues_from_the_last_complete_checkpoint(run_assets):
    from src.trainers.checkpoint import missing_parts

    root = run_assets["root"]
    out, marker = root / "killed", root / "saving_step_4"
    config = stage2_config(run_assets, "killed", out)
    launcher = root / "kill_launcher.py"
    launcher.write_text(KILL_LAUNCHER.format(root=str(ROOT), marker=str(marker)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(launcher), "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the step-4 save"
            assert time.monotonic() < deadline, "the step-4 save never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # mid-save: model and optimizer written, trainer state not yet
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert missing_parts(out / "checkpoint-2") == []
    assert not (out / "checkpoint-4").exists()  # the interrupted save never became a checkpoint
    assert (out / ".checkpoint-4.partial" / "model.safetensors").exists()
    assert missing_parts(out / ".checkpoint-4.partial") == ["trainer_state.json"]
    assert rollout_steps(out) == [1, 1, 2, 2, 3, 3, 4, 4]  # logged before the killed save

    # A fresh run into that directory is refused; resume_from_checkpoint: true continues from checkpoint-2.
    r = sft(config, check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: training.output_dir: {out} already holds another run")
    resumed = stage2_config(run_assets, "resume", out, resume_from_checkpoint=True)
    r = sft(resumed)
    assert f"[resume] continuing from {out / 'checkpoint-2'}" in r.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [h["step"] for h in train_logs(out)] == [1, 2, 3, 4]
    assert missing_parts(out / "checkpoint-4") == [] and not (out / ".checkpoint-4.partial").exists()
    assert rollout_steps(out) == [1, 1, 2, 2, 3, 3, 4, 4]  # steps 3-4 dropped at resume and logged again, once

    # An incomplete checkpoint named explicitly: one line, before any model loads (no "[parallel]" line).
    bad = out / "checkpoint-6"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    r = sft(stage2_config(run_assets, "resume_bad", out, resume_from_checkpoint=str(bad)), check=False)
    assert r.returncode == 2 and "[parallel]" not in r.stdout
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"training.resume_from_checkpoint: {bad} is not a complete checkpoint (missing trainer_state.json" in line
    # ... and resume: true skips it, naming it.
    r = sft(stage2_config(run_assets, "resume_again", out, resume_from_checkpoint=True, max_steps=5))
    assert f"[resume] skipping incomplete {bad}" in r.stdout and f"[resume] continuing from {out / 'checkpoint-4'}" in r.stdout


@pytest.mark.slow
def test_overwrite_output_dir_replaces_the_previous_run(run_assets):
    root = run_assets["root"]
    out = root / "twice"
    sft(stage2_config(run_assets, "first", out, max_steps=2))
    assert (out / "checkpoint-2").exists() and rollout_steps(out) == [1, 1, 2, 2]
    before = sorted(p.name for p in out.iterdir())

    r = sft(stage2_config(run_assets, "second", out, max_steps=1, save_strategy="no"), check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "set training.resume_from_checkpoint: true to continue it, training.overwrite_output_dir: true to replace it" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written

    r = sft(stage2_config(run_assets, "third", out, max_steps=1, save_strategy="no", overwrite_output_dir=True))
    assert "[output] training.overwrite_output_dir: removed the previous run's checkpoint-2, rollouts.jsonl, summary.json, trainer_state.json" in r.stdout
    assert not (out / "checkpoint-2").exists()
    assert rollout_steps(out) == [1, 1]  # the new run's lines only, not appended to the old file
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


def test_replace_dir_keeps_the_previous_directory_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """The one directory swap behind checkpoint publishing and model-dir writes: a stale ``.old`` from a
    killed earlier swap is cleared; a failed rename puts the previous directory back; a good one leaves
    only the new directory."""
    from src.utils import files
    from src.utils.files import replace_dir

    final, new = tmp_path / "checkpoint-4", tmp_path / ".checkpoint-4.partial"
    final.mkdir()
    (final / "v").write_text("old")
    (tmp_path / ".checkpoint-4.old").mkdir()  # left by a killed swap
    new.mkdir()
    (new / "v").write_text("new")
    real = files.os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"):
        replace_dir(new, final)
    assert (final / "v").read_text() == "old" and not (tmp_path / ".checkpoint-4.old").exists()
    monkeypatch.setattr(files.os, "replace", real)
    replace_dir(new, final)
    assert (final / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
