"""Shared set-up for the training tests: one CPU thread, seeded RNGs, isolated working directory."""

from __future__ import annotations

import random

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_and_isolated(tmp_path, monkeypatch):
    """Seed every RNG and run each test inside its own tmp dir (so a stray default
    ``checkpoint_dir='checkpoints'`` can never write into the repository)."""
    torch.manual_seed(0)
    random.seed(0)
    monkeypatch.chdir(tmp_path)
    yield
