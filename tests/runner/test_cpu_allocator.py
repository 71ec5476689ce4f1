"""keep_freed_memory: a CPU training run raises glibc's mmap/trim thresholds; nothing elsewhere."""

import platform

import pytest
import torch

from llmlab.train.setup import keep_freed_memory


def test_not_applied_off_the_cpu():
    assert keep_freed_memory(torch.device("meta")) is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applied_on_a_glibc_cpu():
    assert keep_freed_memory(torch.device("cpu")) is True  # glibc accepted both options
    assert keep_freed_memory(torch.device("cpu")) is True  # idempotent
