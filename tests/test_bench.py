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
    guard = res["cases"]["guard"]
    assert guard["settings"]["defaults"] is True
    for corpus in ("production", "long"):  # a lossless causal guard can never save more than the oracle
        c = guard[corpus]
        assert c["objects_unchanged"] == c["rollouts"]
        assert 0 < c["saved_fraction"] <= c["oracle_saved_fraction"] < 1
    for f in res["figures"]:
        assert {"case", "name", "value", "unit", "goal", "pass"} <= set(f)


def test_bench_rejects_unknown_case(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "src.bench", "--only", "nope", "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown case" in proc.stderr


def test_guard_oracle_keeps_exactly_the_distinct_objects(token_table):
    """The oracle of the guard figure: the shortest prefix whose parse holds every distinct object."""
    from src.bench.guard import _obj_text, oracle_keep
    from src.data.objects import DetObject
    from src.rollout_matching.parser import parse_rollout

    a, b = DetObject("cat", "bbox_2d", (1, 2, 30, 40)), DetObject("dog", "poly", (5, 5, 60, 5, 30, 70))
    text = "{" + ", ".join(_obj_text(o, i + 1) for i, o in enumerate([a, b, a, b, a]))
    ids = token_table.encode(text)
    n = oracle_keep(ids, token_table)
    distinct = lambda k: {(o.desc, o.bins) for o in parse_rollout(ids[:k], token_table).objects}  # noqa: E731
    assert distinct(n) == {(a.desc, a.bins), (b.desc, b.bins)}
    assert len(distinct(n - 1)) == 1  # one token less loses the second object
    assert n < len(ids) // 2  # the three repeats are not needed
    assert oracle_keep(token_table.encode('{"object_1": {"desc": "cat", "bbox_2d": ['), token_table) == 0
