"""CUDA graphs of the compiled decode step, recorded and replayed by us (a candidate: Decoder(graphs="manual")).

torch.compile's own CUDA graphs ("reduce-overhead", cudagraph trees) check, on every call, dynamo's guards
and the trees' invariants: about 300 µs of host time per call for one small graph (pytorch#150488), a
third of a SmolLM2 step, and more with our ~300 weight and cache inputs. Here a step is one dict lookup,
two small copies into the graph's static inputs and a replay: vLLM's way. What the trees check is the
caller's promise instead: the model's weights and cache keep their addresses (`clear()` when the cache
is reallocated: a new `cache_version` clears them), and steps run one at a time on one stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (tokens [n, 1], pos [n, 1], kv units) -> [n, V]


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [n, 1] the graph's inputs, copied into before each replay
    pos: torch.Tensor  # [n, 1]
    logits: torch.Tensor  # [n, V] the graph's output, overwritten by each replay


class StepGraphs:
    """One CUDA graph per bucket (rows, key units) of a compiled step, recorded on first use."""

    def __init__(self, step: Step, cache_version: Callable[[], int]):
        """cache_version: the model's (Transformer.cache_version), which every new cache changes."""
        self.step, self.cache_version = step, cache_version
        self.graphs: dict[tuple[int, int], _Recorded] = {}
        self.pool = torch.cuda.graph_pool_handle()  # shared: steps never overlap, and outputs stay referenced
        self.recorded_over = cache_version()

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, kv_units: int) -> torch.Tensor:
        """The step's logits [n, V] in the graph's output buffer: read or copy them before the next call."""
        if self.cache_version() != self.recorded_over:  # the graphs read the addresses of a cache now gone
            self.clear()
            self.recorded_over = self.cache_version()
        key = (tokens.shape[0], kv_units)
        recorded = self.graphs.get(key)
        if recorded is None:
            recorded = self.graphs[key] = self._record(tokens, pos, kv_units)
        recorded.tokens.copy_(tokens)
        recorded.pos.copy_(pos)
        recorded.graph.replay()
        return recorded.logits

    def clear(self) -> None:
        """Forget every graph (they read the addresses of a cache that was reallocated)."""
        self.graphs.clear()
        # and their pool: a tensor made in it can outlive its graphs, and torch's allocator then refuses to
        # capture into the pool again (an internal assert, seen on an H200 on 2026-11-30)
        self.pool = torch.cuda.graph_pool_handle()

    def _record(self, tokens: torch.Tensor, pos: torch.Tensor, kv_units: int) -> _Recorded:
        tokens, pos = tokens.clone(), pos.clone()
        # On the step's device: streams are made, and capture runs, on the current device, and a model on
        # cuda:1 while cuda:0 is current launched its kernels outside them (an empty graph, stale logits)
        with torch.cuda.device(tokens.device):
            # Compile (the first call for a size) and warm up outside the capture, on a side stream as CUDA
            # graphs want. It writes the cache where the replay writes the same values.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(tokens, pos, kv_units)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.step(tokens, pos, kv_units)
        return _Recorded(graph, tokens, pos, logits)
