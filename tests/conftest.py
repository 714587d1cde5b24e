"""Shared fixtures and switches for the test suite.

CYCLEMIRROR_SLOW=1 turns on the long trials (crash loops with many kills,
big volumes); the default run keeps them small so the suite stays fast.
"""

import os
import shutil

import pytest

SLOW = os.environ.get("CYCLEMIRROR_SLOW") == "1"


def require_tool(name: str) -> str:
    """Return the path of an external client, or skip saying which package brings it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/install-deps installs it)")
    return path


@pytest.fixture
def slow_mode() -> bool:
    return SLOW
