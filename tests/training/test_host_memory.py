"""The allocator setting the Trainer makes at fit(): in effect on glibc, left alone when the user chose."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from mlff_distiller.training import ConfigError, TrainingConfig, host_memory

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)


@glibc
def test_kept_heap_lets_freed_buffers_be_reallocated_without_faults():
    """After the settings, re-allocating freed 4 MiB buffers costs (almost) no page faults. (Setting the pad or
    trim threshold alone freezes glibc's mmap threshold at its 128 KiB start: each buffer a fresh mapping, ~1,000
    faults; the 32 MiB threshold set with them prevents that.)"""
    assert host_memory.keep_freed_host_memory(1024)

    def faults_of_reallocating() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            buffers = [torch.ones(1 << 20) for _ in range(8)]  # 8 x 4 MiB, touched, then freed together
            del buffers
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_reallocating()  # grows the heap once
    assert faults_of_reallocating() < 20 * 8 * 1024 // 10  # mapped anew: ~1,000 faults per buffer


def test_zero_or_a_user_setting_leaves_the_allocator_alone(monkeypatch):
    assert not host_memory.keep_freed_host_memory(0)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert not host_memory.keep_freed_host_memory(1024)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
    assert not host_memory.keep_freed_host_memory(1024)


def test_negative_amount_is_a_config_error():
    with pytest.raises(ConfigError, match="host_memory_keep_mb"):
        TrainingConfig(host_memory_keep_mb=-1)
