"""Smoke test of the benchmark entry point (no timing assertions: figures depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_pipeline_writes_results(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "src.bench", "--quick", "--only", "pipeline,guard", "--tiny", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout
    res = json.loads(out.read_text())
    assert {"mode", "machine", "figures", "cases", "settings", "wall_s", "passed", "failed"} <= set(res)
    assert {"cpu", "cores", "torch", "transformers", "date"} <= set(res["machine"])
    assert set(res["cases"]) == {"pipeline", "guard"}
    assert {"ms_per_object", "sizes"} <= set(res["cases"]["pipeline"])
    assert res["cases"]["guard"]["settings"]["defaults"] is True
    for f in res["figures"]:
        assert {"case", "name", "value", "unit", "goal", "pass"} <= set(f)


def test_bench_rejects_unknown_case(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "src.bench", "--only", "nope", "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown case" in proc.stderr
