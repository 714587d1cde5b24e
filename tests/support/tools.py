"""Switches and checks every test module may use: the slow-trial switch and required tools."""

import os
import shutil

import pytest

# CYCLEMIRROR_SLOW=1 turns on the long trials (crash loops with many kills, big volumes).
SLOW = os.environ.get("CYCLEMIRROR_SLOW") == "1"


def require_tool(name: str) -> str:
    """Return the path of an external client, or skip saying which package brings it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/install-deps installs it)")
    return path
