"""The hybrid decode step with every GPU segment replayed as a CUDA graph.

A layer with cold rows cannot be one graph: the CPU must compute its cold neurons between the
GPU's two halves. So each layer is three graphs, with the CPU work between the second and the
third (DESIGN.md, "One decode step"):

    pre   attention -> h_mid; x = ffn_norm(h_mid); predictor; D2H copy of x (+ selection)
    hot   hot FFN over the selected hot rows                    (GPU)  ┐ overlapped
          -- host waits for x, runs the Numba cold FFN --       (CPU)  ┘
    post  H2D copy of y_cold; h = h_mid + (y_hot + y_cold) * residual scale

Replaying a graph costs one launch instead of dozens, which removes most of the per-layer
Python and launch overhead of the eager step (measured: ~1.8 ms per layer on the H100 machine).
All segments share one memory pool and are captured and replayed in the same order, so every
static output stays valid as the next segment's input.
"""
from __future__ import annotations

import torch

from hybrid_runtime.hybrid import CudaStaging, HybridFFN


class HybridGraphedDecodeStep:
    """Batch-1, one-token decode of a hybrid model on CUDA; call like the model (tokens, input_pos)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, warmup_pos: int):
        self.model, self.device = model, device
        cfg = model.config
        layers = list(model.layers)
        ffns = [layer.ffn for layer in layers]
        if not all(isinstance(f, HybridFFN) for f in ffns):
            raise TypeError("HybridGraphedDecodeStep needs every layer's FFN to be a HybridFFN")
        self.staging: CudaStaging = next(f.staging for f in ffns)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        # warm-up and capture write K/V at warmup_pos: the last cache slot, overwritten before it is read
        self.pos = torch.full((1,), warmup_pos, dtype=torch.long, device=device)
        with torch.inference_mode():
            for _ in range(2):  # eager warm-up: cuBLAS handles, lazy kernel loading, Numba compilation
                model(self.token, self.pos)
        torch.cuda.synchronize(device)
        pool = torch.cuda.graph_pool_handle()
        d, rs = cfg.dim, cfg.residual_scale

        def capture(fn):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                out = fn()
            return graph, out

        def first():
            mask = model.causal_mask[self.pos]                     # (1, S)
            cos, sin = model.rope_cos[self.pos], model.rope_sin[self.pos]
            h = model.tok_embeddings(self.token)                   # (1, 1, d)
            if cfg.scale_emb != 1.0:
                h = h * cfg.scale_emb
            return h, mask, cos, sin

        self.g_first, (h, mask, cos, sin) = capture(first)
        self.segments = []
        for layer, ffn in zip(layers, ffns):
            def pre(h=h, layer=layer, ffn=ffn):
                h_mid = h + layer.attn(layer.attn_norm(h), cos, sin, mask, self.pos) * rs
                x = ffn.norm(h_mid).view(1, d)
                hot_logits, cold_sel = ffn.select(h_mid.view(1, d), x)
                views = self.staging.copy_to_host(x, cold_sel) if ffn.cold is not None else None
                return h_mid, x, hot_logits, views

            g_pre, (h_mid, x, hot_logits, views) = capture(pre)
            g_hot, y_hot = capture(lambda ffn=ffn, x=x, hot_logits=hot_logits: ffn.hot_ffn(x, hot_logits))
            if ffn.cold is not None:
                def post(h_mid=h_mid, y_hot=y_hot):
                    y_cold = self.staging.y[:1].to(device, non_blocking=True).to(y_hot.dtype)
                    return h_mid + (y_hot + y_cold).view(1, 1, d) * rs
            else:
                def post(h_mid=h_mid, y_hot=y_hot):
                    return h_mid + y_hot.view(1, 1, d) * rs
            g_post, h = capture(post)
            self.segments.append((g_pre, g_hot, g_post, ffn if ffn.cold is not None else None, views))

        def last(h=h):
            out = model.norm(h)
            if cfg.logit_scale != 1.0:
                out = out * cfg.logit_scale
            return model.output(out).float()

        self.g_last, self.logits = capture(last)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self.token.copy_(tokens)
        self.pos.copy_(input_pos)
        self.g_first.replay()
        staging = self.staging
        for g_pre, g_hot, g_post, cold_ffn, views in self.segments:
            g_pre.replay()
            if cold_ffn is None:
                g_hot.replay()
                g_post.replay()
                continue
            staging.ready.record()   # behind the D2H copies of this layer's x and selection
            g_hot.replay()           # the GPU computes the hot half while the CPU computes the cold half
            staging.wait()           # deliberate sync: the CPU half needs x
            cold_ffn.cold_ffn(*views)  # writes the pinned y buffer that g_post copies to the GPU
            g_post.replay()
        self.g_last.replay()
        return self.logits
