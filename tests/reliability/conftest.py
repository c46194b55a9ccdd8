"""The reliability battery's signals (its figures: ``reliability_report`` in ../conftest.py)."""

from __future__ import annotations

import signal

import pytest


@pytest.fixture(autouse=True)
def _sigint_delivered():
    """Tests send SIGINT to this process; under nohup or as a background job it would be ignored, and the
    Trainer (rightly) leaves an ignored signal alone. Restore Python's default for the test."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
