"""Hypothesis profiles for the property and fuzz tests (docs/fuzzing.md).

``default`` (``make test``) is small, derandomized and keeps no example
database, so CI runs the same examples every time in a few seconds.  ``fuzz``
(``make fuzz``, or ``HYPOTHESIS_PROFILE=fuzz``) draws many more, with a fresh
seed each run, and keeps failing examples in ``.hypothesis/`` so the next run
replays them first.  Neither has a deadline: the machine is shared and timing
failures would be noise.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("default", max_examples=25, deadline=None, derandomize=True,
                          database=None, print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "3000")),
                          deadline=None, derandomize=False, print_blob=True,
                          database=DirectoryBasedExampleDatabase(".hypothesis/examples"),
                          suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
