"""Performance benchmarks of the stage-2 path (``python -m src.bench``; see :mod:`src.bench.__main__` and
docs/performance.md): one module per case (rollout, pipeline, lean, guard, step), shared helpers in
:mod:`src.bench.common`."""
