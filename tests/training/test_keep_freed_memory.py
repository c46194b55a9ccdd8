"""The allocator setting the Trainer makes at fit(): freed blocks are reused without page faults, the user's own
malloc settings win, and ``keep_freed_memory=False`` leaves the allocator alone."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

import mlff_distiller.memory
from mlff_distiller.memory import keep_freed_memory, user_chose_malloc_settings
from mlff_distiller.training import Trainer, TrainingConfig

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)


@glibc
def test_freed_buffers_are_reallocated_without_page_faults():
    """Re-allocating freed 4 MiB buffers costs (almost) no page faults once the heap has grown: without the
    setting each could be a fresh mapping or trimmed heap, ~1,000 faults per buffer."""
    if user_chose_malloc_settings():
        pytest.skip("the environment sets malloc's parameters")
    assert keep_freed_memory()

    def faults_of_reallocating() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            buffers = [torch.ones(1 << 20) for _ in range(8)]  # 8 x 4 MiB, touched, then freed together
            del buffers
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_reallocating()  # grows the heap once
    assert faults_of_reallocating() < 20 * 8 * 1024 // 10


def test_a_users_malloc_settings_are_recognised(monkeypatch):
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert not user_chose_malloc_settings()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert user_chose_malloc_settings()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
    assert user_chose_malloc_settings()


@pytest.mark.parametrize("keep", [True, False])
def test_fit_applies_the_setting_only_when_asked(monkeypatch, keep):
    calls = []
    monkeypatch.setattr(mlff_distiller.memory, "keep_freed_memory", lambda: calls.append(1) or True)
    model = torch.nn.Linear(2, 1)
    data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(2)]
    config = TrainingConfig(max_epochs=1, checkpoint_dir=None, device="cpu", keep_freed_memory=keep)
    loss = lambda m, batch: {"loss": torch.nn.functional.mse_loss(m(batch[0]), batch[1])}  # noqa: E731
    Trainer(model, data, data, config=config, loss_fn=loss, loggers=[]).fit()
    assert calls == ([1] if keep else [])
