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
    _uniform: int | None | bool = field(default=False, repr=False)  # False: not computed yet
    _chunks: dict = field(default_factory=dict, repr=False, compare=False)
    _by_row: dict = field(default_factory=dict, repr=False, compare=False)

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

    def validate(self) -> "CSRGraph":
        """Raise a ValueError naming what is wrong; returns self so calls chain."""
        n, e = self.num_nodes, self.num_edges
        if self.offsets.numel() != n + 1:
            raise ValueError(f"CSRGraph: offsets has {self.offsets.numel()} entries, expected num_nodes + 1 = {n + 1}")
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != e:
            raise ValueError(f"CSRGraph: offsets must run from 0 to num_edges={e}, got {int(self.offsets[0])}..{int(self.offsets[-1])}")
        if bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("CSRGraph: offsets must be non-decreasing (edges sorted by receiver)")
        if self.receivers.numel() != e:
            raise ValueError(f"CSRGraph: {self.receivers.numel()} receivers for {e} senders")
        if e and (int(self.senders.min()) < 0 or int(self.senders.max()) >= n):
            raise ValueError(f"CSRGraph: sender index out of range [0, {n})")
        expected = torch.repeat_interleave(torch.arange(n, device=self.offsets.device), self.degree())
        if not torch.equal(expected, self.receivers):
            raise ValueError("CSRGraph: receivers disagree with offsets (edges must be sorted by receiver)")
        return self

    def to(self, device) -> "CSRGraph":
        return CSRGraph(
            senders=self.senders.to(device), receivers=self.receivers.to(device),
            offsets=self.offsets.to(device), num_nodes=self.num_nodes,
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

    def by_row(self, edge_index: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_perm [E], row_offsets [R + 1]) for an edge → table-row map (edge e reads row
        edge_index[e], e.g. its distinct length): edge ids sorted stably by row, so the kernels sum
        each row's gradient over its edges in a fixed order. Cached per index tensor (every layer of
        one forward passes the same one)."""
        key = (edge_index.data_ptr(), edge_index.numel(), num_rows, str(edge_index.device))
        if key not in self._by_row:
            perm = torch.sort(edge_index, stable=True).indices
            counts = torch.bincount(edge_index, minlength=num_rows)
            offsets = torch.zeros(num_rows + 1, dtype=torch.long, device=edge_index.device)
            offsets[1:] = torch.cumsum(counts, 0)
            self._by_row = {key: (perm, offsets)}  # one index per graph at a time
        return self._by_row[key]

    def merge_parallel(self, edge_index: torch.Tensor, num_rows: int):
        """Merge edges that carry the same message: same receiver, same sender, same table row.

        When every edge feature is a function of the edge length (row edge_index[e] of a distinct-
        length table), periodic images of one sender at one distance from a receiver send identical
        messages; MP-20 kNN batches have ~1.4–1.5 edges per distinct (i, j, |r|). A sum over them is
        a sum over the merged edges weighted by their count, so the aggregation walks fewer edges.
        → (graph [E' edges, receiver-sorted], edge_index [E'], edge_count [E'] long). Exact for sums;
        not for ops whose weights are normalised per edge unless the count enters them too."""
        n, e = self.num_nodes, self.num_edges
        if e == 0 or n * n * max(num_rows, 1) >= 2**62:  # the key would overflow: keep the edges
            return self, edge_index, torch.ones(e, dtype=torch.long, device=self.senders.device)
        key = (self.receivers * n + self.senders) * num_rows + edge_index  # [E], sorted by receiver first
        unique, count = torch.unique(key, sorted=True, return_counts=True)  # [E']
        rows = unique % num_rows
        pair = unique // num_rows
        senders, receivers = pair % n, pair // n
        offsets = torch.zeros(n + 1, dtype=torch.long, device=self.senders.device)
        offsets[1:] = torch.cumsum(torch.bincount(receivers, minlength=n), 0)
        merged = CSRGraph(senders=senders, receivers=receivers, offsets=offsets, num_nodes=n)
        return merged, rows, count

    # --- helpers for the chunked CPU backend (host-side ints, cached) -------------------------

    def uniform_degree(self) -> int | None:
        """k when every receiver has exactly k ≥ 1 edges (kNN graphs), else None. Cached."""
        if self._uniform is False:
            deg = self.degree()
            k = int(deg[0]) if deg.numel() else 0
            self._uniform = k if k > 0 and bool((deg == k).all()) else None
        return self._uniform

    def receiver_chunks(self, max_edges: int) -> list[tuple[int, int, int, int]]:
        """Split receivers into runs [r0, r1) whose edges [e0, e1) number about `max_edges`.

        A receiver's whole segment stays in one chunk (a softmax needs all of it); a receiver
        with more than `max_edges` edges gets a chunk of its own. Cached per `max_edges`."""
        cache = self._chunks
        if max_edges not in cache:
            offsets = self.offsets.tolist()
            chunks, r0 = [], 0
            while r0 < self.num_nodes:
                # last receiver r1 with offsets[r1] - offsets[r0] <= max_edges, at least r0 + 1
                r1 = int(torch.searchsorted(self.offsets, offsets[r0] + max_edges, right=True)) - 1
                r1 = min(max(r1, r0 + 1), self.num_nodes)
                chunks.append((r0, r1, offsets[r0], offsets[r1]))
                r0 = r1
            cache[max_edges] = chunks
        return cache[max_edges]
