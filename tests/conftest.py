"""Shared fixtures for the test suite (helpers live in ``tests.support``).

CYCLEMIRROR_SLOW=1 turns on the long trials (crash loops with many kills,
big volumes); the default run keeps them small so the suite stays fast.
"""

import pytest

from tests.support.tools import SLOW


@pytest.fixture
def slow_mode() -> bool:
    return SLOW
