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
def test_pad_keeps_freed_heap_so_reallocating_does_not_fault():
    """After the settings, re-allocating freed 4 MiB buffers costs (almost) no page faults. (The pad alone would
    freeze glibc's mmap threshold at its 128 KiB start, making each such buffer a fresh mapping: ~1,000 faults.)"""
    assert host_memory.keep_freed_host_memory(64)

    def faults_of_reallocating() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            buffers = [torch.ones(1 << 20) for _ in range(8)]  # 8 x 4 MiB, touched, then freed together
            del buffers
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_reallocating()  # grows the heap once
    assert faults_of_reallocating() < 20 * 8 * 1024 // 10  # without the pad: ~1,000 faults per 4 MiB buffer


def test_no_pad_or_a_user_setting_leaves_the_allocator_alone(monkeypatch):
    assert not host_memory.keep_freed_host_memory(0)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "131072")
    assert not host_memory.keep_freed_host_memory(64)
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.top_pad=131072")
    assert not host_memory.keep_freed_host_memory(64)


def test_negative_pad_is_a_config_error():
    with pytest.raises(ConfigError, match="host_memory_pad_mb"):
        TrainingConfig(host_memory_pad_mb=-1)
