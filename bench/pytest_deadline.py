"""A pytest plugin (``PYTEST_PLUGINS=pytest_deadline``, bench/ on the path of the run and of its xdist
workers): once the wall clock passes ``$HALLOLIVE_PYTEST_DEADLINE`` (Unix seconds), every test not yet
started is skipped with the reason ``REASON`` before its fixtures are set up, so a run bounded by a time
box ends on its own, writes its summary, and names the tests it did not reach."""

from __future__ import annotations

import os
import time

import pytest

REASON = "not run: the entry's time box ended before this test started"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = os.environ.get("HALLOLIVE_PYTEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(REASON)
