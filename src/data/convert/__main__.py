"""``python -m src.data.convert``: the CLI lives in :mod:`src.data.convert.cli`."""

from src.data.convert.cli import main

raise SystemExit(main())
