"""Suite-wide set-up: generated datasets go to one temporary cache shared by every test and subprocess."""

from __future__ import annotations

import os

import pytest


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
