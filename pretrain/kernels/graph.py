"""Receiver-sorted CSR edges, the one graph format every aggregation backend takes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CSRGraph:
    """Edges sorted by receiver: edge e belongs to receiver i when offsets[i] <= e < offsets[i+1].

    senders[e] is the source atom j of edge e; receivers[e] = i is kept too because the native
    backends scatter with it. The sender-keyed view (for gradients w.r.t. sender features) is
    built on first use and cached: `sender_perm` lists edge ids sorted (stably) by sender and
    `sender_offsets` delimits each sender's run.
    """

    senders: torch.Tensor  # [E] long
    receivers: torch.Tensor  # [E] long, non-decreasing
    offsets: torch.Tensor  # [N + 1] long
    num_nodes: int
    _by_sender: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_offsets(cls, senders: torch.Tensor, offsets: torch.Tensor) -> "CSRGraph":
        num_nodes = int(offsets.numel() - 1)
        degree = offsets[1:] - offsets[:-1]
        receivers = torch.repeat_interleave(torch.arange(num_nodes, device=offsets.device), degree)
        return cls(senders=senders.long(), receivers=receivers, offsets=offsets.long(), num_nodes=num_nodes)

    @classmethod
    def from_batch(cls, batch) -> "CSRGraph":
        """From a CrystalBatch graph view."""
        if batch.edge_src is None:
            raise ValueError("batch has no graph view: build it with a neighbour rule")
        return cls(
            senders=batch.edge_src, receivers=batch.edge_dst, offsets=batch.csr_offsets, num_nodes=batch.num_nodes
        )

    @property
    def num_edges(self) -> int:
        return int(self.senders.numel())

    def degree(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def by_sender(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sender_perm [E], sender_offsets [N + 1]): a CSR keyed by sender, for backward passes."""
        if self._by_sender is None:
            perm = torch.sort(self.senders, stable=True).indices
            counts = torch.bincount(self.senders, minlength=self.num_nodes)
            offsets = torch.zeros(self.num_nodes + 1, dtype=torch.long, device=self.senders.device)
            offsets[1:] = torch.cumsum(counts, 0)
            self._by_sender = (perm, offsets)
        return self._by_sender
