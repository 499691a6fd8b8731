"""Fixtures shared by the pretrain tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The models under test are tiny: with two threads, thread hand-offs dominate (up to 50×
    slower on a busy machine). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
