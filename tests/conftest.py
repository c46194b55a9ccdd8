"""Suite-wide set-up: one CPU thread, seeded RNGs, and one temporary dataset cache shared by every
test and subprocess."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--kill-sweep",
        type=int,
        default=6,
        help="number of SIGKILLs in the reliability battery's kill sweep (CI: 6; the reported figure: 24)",
    )
    parser.addoption(
        "--md-long",
        action="store_true",
        help="run the MD engines' NVT checks 6x longer (tighter statistics; about a minute per engine)",
    )
    parser.addoption(
        "--inductor",
        action="store_true",
        help="also check the students' inductor-compiled path (model.compile=true; minutes of compilation)",
    )


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory):
    """The built-in dataset generator caches under $XDG_CACHE_HOME; keep it out of the user's home and
    let the CLI subprocesses (which inherit the environment) reuse what an earlier test generated."""
    previous = os.environ.get("XDG_CACHE_HOME")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under pytest -n, the workers share one cache (its builders hold file locks): each dataset is built once.
        cache = tmp_path_factory.getbasetemp().parent / "xdg_cache"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("xdg_cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


# The reliability battery reports figures, not only passes: its tests add lines with ``reliability_report``
# and they are printed at the end of the run (here, in the root conftest: under pytest -n the controller, which
# prints the summary, loads only this one).
_LINES: list[tuple[str, str]] = []


@pytest.fixture
def reliability_report():
    def add(name: str, figures: str) -> None:
        _LINES.append((name, figures))

    return add


def pytest_sessionfinish(session):
    """Under pytest -n (xdist) a worker hands its lines to the controller, which prints them."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["reliability_lines"] = list(_LINES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _LINES.extend(tuple(line) for line in getattr(node, "workeroutput", {}).get("reliability_lines", []))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _LINES:
        terminalreporter.section("reliability battery: figures")
        for name, figures in _LINES:
            terminalreporter.write_line(f"{name}: {figures}")
