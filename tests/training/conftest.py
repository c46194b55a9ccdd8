"""Training tests run inside their own tmp dir (threads and seeds are set suite-wide in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """A stray default ``checkpoint_dir='checkpoints'`` can never write into the repository."""
    monkeypatch.chdir(tmp_path)
    yield
