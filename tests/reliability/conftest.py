"""The reliability battery reports figures, not only passes: tests add lines with ``reliability_report``
and they are printed at the end of the pytest run."""

from __future__ import annotations

import signal

import pytest

_LINES: list[tuple[str, str]] = []


@pytest.fixture
def reliability_report():
    def add(name: str, figures: str) -> None:
        _LINES.append((name, figures))

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _LINES:
        terminalreporter.section("reliability battery: figures")
        for name, figures in _LINES:
            terminalreporter.write_line(f"{name}: {figures}")


@pytest.fixture(autouse=True)
def _sigint_delivered():
    """Tests send SIGINT to this process; under nohup or as a background job it would be ignored, and the
    Trainer (rightly) leaves an ignored signal alone. Restore Python's default for the test."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
