"""CUDA-graph capture and replay of the decode step.

A decode step has no host synchronisation and fixed shapes (the kernels read each row's length from the device), so
on CUDA it is captured once in a CUDA graph and replayed: one launch per step instead of hundreds of small ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class DecodeGraph:
    """A decode step `step(ids) -> logits` (ids (B,) int64, logits (B, vocab)) captured on the first call, replayed
    after (the step comes with every call rather than being kept: a runtime holding a graph that held the runtime
    would be freed only by the garbage collector, its cache with it).

    state: the device tensors the step advances in place (the cache's lengths, the positions). Capturing needs two
    eager warm-up steps first (they compile the kernels and settle the allocator); each is undone by restoring
    these tensors (what a warm-up wrote into the cache sits in the slot the real step overwrites)."""

    def __init__(self, state: list[torch.Tensor]):
        self.state = state
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ids: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def _capture(self, step: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> None:
        self.ids = ids.clone()
        saved = [(t, t.clone()) for t in self.state]

        def restore() -> None:
            for t, v in saved:
                t.copy_(v)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the kernels and settle the allocator outside the capture
                restore()
                step(self.ids)
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.ids)
        restore()  # capturing ran nothing, but keep the invariant explicit

    def __call__(self, step: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self._capture(step, ids)
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits.clone()
