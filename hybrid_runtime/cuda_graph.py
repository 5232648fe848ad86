"""Decode steps replayed as CUDA graphs, so kernel-launch overhead does not dominate batch-1 decode."""
from __future__ import annotations

import torch


class GraphedDecodeStep:
    """One decode step (batch 1, one token) of a model whose forward has no host syncs, captured once.

    Static input buffers (token, position) are filled before each replay; the returned logits
    tensor is the graph's static output (valid until the next replay)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, warmup_pos: int):
        self.model = model
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        # warm-up and capture write K/V at warmup_pos: use the last cache slot, which generation
        # overwrites before it ever reads it
        self.pos = torch.full((1,), warmup_pos, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):
                model(self.token, self.pos)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = model(self.token, self.pos)

    def describe(self) -> str:
        return "CUDA graph decode"

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        # kv_len is not needed: the graph attends over the whole pre-allocated cache (masked)
        self.token.copy_(tokens)
        self.pos.copy_(input_pos)
        self.graph.replay()
        return self.logits
