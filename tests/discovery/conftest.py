"""Discovery fixtures: a tiny Crys-JEPA trained for a few steps on real MP-20 crystals."""
from __future__ import annotations

import pytest

TINY_JEPA = {"name": "jepa", "encoder": {"name": "jepa_transformer", "width": 32, "num_layers": 1, "heads": 4}}


@pytest.fixture(scope="session")
def tiny_jepa(tmp_path_factory, mp20_records):
    """A released JEPA after 20 Adam steps on 32 real crystals: real weights, not a useful model."""
    import torch

    from data_pipeline.load.collate import BatchViews, collate
    from pretrain.objectives import build_objective
    from pretrain.release import save_release

    torch.manual_seed(0)
    jepa = build_objective(TINY_JEPA)
    optimizer = torch.optim.Adam(jepa.parameters(), lr=1e-3)
    batch = collate(mp20_records[:32], BatchViews.from_dict(jepa.batch_views()))
    for _ in range(20):
        loss, _ = jepa.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_release(jepa, TINY_JEPA, tmp_path_factory.mktemp("jepa") / "jepa", views=jepa.batch_views())
