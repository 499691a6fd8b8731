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


@pytest.fixture
def summed_grads():
    """The helper below, as a fixture (test modules cannot import a conftest by name safely)."""
    return summed_loss_and_grads


def summed_loss_and_grads(objective, batches, norm):
    """(Σ loss, gradients) of `objective` over `batches`, every loss normalised by the same `norm`:
    the trainer's contract is that the parts of a batch give the gradient of the whole."""
    objective.zero_grad()
    total = sum(objective.loss(b, norm)[0] for b in batches)
    total.backward()
    return float(total), [p.grad.clone() for p in objective.parameters() if p.grad is not None]
