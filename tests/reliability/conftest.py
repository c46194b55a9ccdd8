"""The reliability battery reports figures, not only passes: tests add lines with ``reliability_report``
and they are printed at the end of the pytest run."""

from __future__ import annotations

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
