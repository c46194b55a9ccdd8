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
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous
