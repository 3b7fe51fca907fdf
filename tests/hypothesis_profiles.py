"""Hypothesis profiles for the reliability tests (imported by tests/test_fuzz.py and friends).

* ``bounded`` (default): a fixed, modest number of examples per property so the normal suite stays fast.
* ``long``: opt in with ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py`` for a soak run.

Only tests that do not pin ``max_examples`` themselves follow the profile.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

BOUNDED_EXAMPLES = 150
LONG_EXAMPLES = 5000

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], print_blob=True)
settings.register_profile("bounded", max_examples=BOUNDED_EXAMPLES, **_COMMON)
settings.register_profile("long", max_examples=LONG_EXAMPLES, **_COMMON)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "bounded")
settings.load_profile(PROFILE)
EXPECTED_EXAMPLES = settings.get_profile(PROFILE).max_examples
