"""The dense engine's fused decode path: fused q/k/v, one RoPE for q and k, F.rms_norm, index_copy_
KV updates, one-kernel residual adds, an additive mask made once per step.

CPU: each fused piece against HF's own formula (bit-equal in fp32), the on-disk names kept
(state_dict / load_state_dict / pack speak wq, wk, wv), gradients through the fused projection,
and the ATen ops one decode step runs per layer. GPU (skipped without CUDA): fp16/bf16 logits
against transformers, CUDA-graph decode against eager, and CUDA kernels launched per layer.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybrid_runtime.loading import load_model
from hybrid_runtime.model import KVCache, ModelConfig, RMSNorm, Transformer, apply_rope, rope_inv_freq

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_config(**kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=262, act="relu")
    return ModelConfig(**{**base, **kw})


def random_engine(cfg: ModelConfig, dtype=torch.float32, seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- pieces vs HF

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_bit_equal_to_hf(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 30.0):  # eps matters at the small scale
        x = (torch.randn(2, 5, 256, generator=g) * scale).to(dtype)
        ours, ref = RMSNorm(256, 1e-5), LlamaRMSNorm(256, eps=1e-5)
        with torch.no_grad():
            ours.weight.copy_(torch.randn(256, generator=g))
            ref.weight.copy_(ours.weight)
            ours, ref = ours.to(dtype), ref.to(dtype)
            assert torch.equal(ours(x), ref(x)), f"{dtype}, scale {scale}"


def _hf_cos_sin(cfg: ModelConfig, pos: torch.Tensor):
    """HF's tables: emb = cat(freqs, freqs), cos(emb), sin(emb) (fp32)."""
    freqs = torch.outer(pos.float(), rope_inv_freq(cfg))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_rope_on_q_and_k_together_is_bit_equal_to_hf_rotate_half(head_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    cfg = tiny_config(dim=4 * head_dim, head_dim=head_dim)
    model = Transformer(cfg)
    model.setup_cache(1, 512)
    pos = torch.tensor([0, 5, 77, 300, 511])
    cos, sin = _hf_cos_sin(cfg, pos)                                        # (T, hs)
    # the tables the engine keeps: cos as HF's, sin with rotate_half's sign in its first half
    assert torch.equal(model.rope_cos[pos], cos)
    assert torch.equal(model.rope_sin[pos], torch.cat((-sin[:, :head_dim // 2], sin[:, head_dim // 2:]), -1))
    g = torch.Generator().manual_seed(1)
    nh, nkv, T = 4, 2, len(pos)
    qk = torch.randn(2, T, nh + nkv, head_dim, generator=g) * 3              # (B, T, nh+nkv, hs)
    ours = apply_rope(qk, model.rope_cos[pos][:, None], model.rope_sin[pos][:, None])
    q_ref, k_ref = apply_rotary_pos_emb(qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2),
                                        cos[None], sin[None])             # (B, heads, T, hs)
    assert torch.equal(ours[:, :, :nh].transpose(1, 2), q_ref)
    assert torch.equal(ours[:, :, nh:].transpose(1, 2), k_ref)
    # half precision: computed in fp32 from the exactly-promoted input, rounded once at the end
    for dtype in (torch.bfloat16, torch.float16):
        x = qk.to(dtype)
        q32, k32 = apply_rotary_pos_emb(x[:, :, :nh].float().transpose(1, 2), x[:, :, nh:].float().transpose(1, 2),
                                        cos[None], sin[None])
        out = apply_rope(x, model.rope_cos[pos][:, None], model.rope_sin[pos][:, None])
        assert out.dtype == dtype
        assert torch.equal(out[:, :, :nh].transpose(1, 2), q32.to(dtype))
        assert torch.equal(out[:, :, nh:].transpose(1, 2), k32.to(dtype))


def test_kv_cache_update_writes_only_the_given_positions():
    cache = KVCache(2, 3, 16, 8, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    ref_k, ref_v = torch.zeros(2, 3, 16, 8), torch.zeros(2, 3, 16, 8)
    for pos in ([0, 1, 2, 3], [4], [9, 5]):
        p = torch.tensor(pos)
        k = torch.randn(2, len(pos), 3, 8, generator=g).transpose(1, 2)   # strided, as Attention passes it
        v = torch.randn(2, len(pos), 3, 8, generator=g).transpose(1, 2)
        k_all, v_all = cache.update(p, k, v)
        ref_k[:, :, p], ref_v[:, :, p] = k, v
        assert k_all is cache.k and v_all is cache.v
        assert torch.equal(k_all, ref_k) and torch.equal(v_all, ref_v)


def test_bool_and_additive_masks_give_the_same_layer_output():
    """hybrid_graph and the layer-offload bench pass the bool mask; Transformer.forward an additive one."""
    cfg = tiny_config(sliding_window=4)
    model = random_engine(cfg)
    model.setup_cache(1, 16)
    pos = torch.arange(7)
    h = torch.randn(1, 7, cfg.dim)
    cos, sin, allowed = model.rope_cos[pos], model.rope_sin[pos], model.causal_mask[pos]
    with torch.no_grad():
        a = model.layers[0](h, cos, sin, allowed, pos)
        b = model.layers[0](h, cos, sin, torch.where(allowed, 0.0, float("-inf")), pos)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- names, loading, gradients

def test_state_dict_speaks_the_on_disk_qkv_names():
    cfg = tiny_config(attention_bias=True)
    model = random_engine(cfg)
    sd = model.state_dict()
    assert not any("wqkv" in n for n in sd)
    a = model.layers[1].attn
    nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for kind in ("weight", "bias"):
        fused = getattr(a.wqkv, kind)
        parts = [sd[f"layers.1.attn.{n}.{kind}"] for n in ("wq", "wk", "wv")]
        assert [p.shape[0] for p in parts] == [nq, nkv, nkv]
        assert torch.equal(torch.cat(parts), fused)
    # and loads back, strictly, into a fresh module (also by assignment onto the meta device)
    fresh = random_engine(cfg, seed=1)
    fresh.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True, assign=True)
    for m in (fresh, meta):
        assert torch.equal(m.layers[1].attn.wqkv.weight, a.wqkv.weight)
        assert torch.equal(m.layers[1].attn.wqkv.bias, a.wqkv.bias)
    del sd["layers.0.attn.wk.weight"]
    with pytest.raises(RuntimeError, match="wqkv.weight"):
        fresh.load_state_dict(sd, strict=True)


def test_loaded_wqkv_rows_are_hf_q_k_v(make_hf_model):
    hf, path = make_hf_model(attention_bias=True)
    model = load_model(path)
    for i, layer in enumerate(hf.model.layers):
        att = layer.self_attn
        ours = model.layers[i].attn.wqkv
        assert torch.equal(ours.weight, torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
        assert torch.equal(ours.bias, torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))


def test_missing_k_proj_is_named_by_its_native_name(make_hf_model):
    from safetensors.torch import load_file, save_file

    from hybrid_runtime.errors import UserError
    _, path = make_hf_model()
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"layers\.1\.attn\.wk\.weight"):
        load_model(path)


def test_pack_writes_split_qkv(make_hf_model, tmp_path):
    import numpy as np
    from safetensors import safe_open

    from hybrid_runtime.hybrid_format import pack_hybrid_model
    hf, path = make_hf_model(hidden_act="relu")
    freqs = [np.random.default_rng(i).random(160) for i in range(2)]
    out = pack_hybrid_model(path, tmp_path / "hyb", freqs)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert not any("wqkv" in n for n in names)
        for i, layer in enumerate(hf.model.layers):
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
                w = f.get_tensor(f"layers.{i}.attn.{ours}.weight")
                assert torch.equal(w, getattr(layer.self_attn, theirs).weight.detach())


def test_gradients_reach_the_fused_projection_as_hf_computes_them(make_hf_model):
    hf, path = make_hf_model(attention_bias=True)
    model = load_model(path).requires_grad_(True)
    model.setup_cache(1, 16)
    ids = torch.randint(3, 262, (1, 10), generator=torch.Generator().manual_seed(0))
    target = torch.randn(1, 10, 262, generator=torch.Generator().manual_seed(1))
    (model(ids, torch.arange(10)) * target).sum().backward()
    (hf(ids).logits * target).sum().backward()
    for i, layer in enumerate(hf.model.layers):
        att, ours = layer.self_attn, model.layers[i].attn.wqkv
        for kind in ("weight", "bias"):
            ref = torch.cat([getattr(getattr(att, p), kind).grad for p in ("q_proj", "k_proj", "v_proj")])
            torch.testing.assert_close(getattr(ours, kind).grad, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- ops per decode step

class _OpCounter(TorchDispatchMode):
    """ATen ops that compute (not views, not detach) as dispatched below autograd."""

    _IGNORED = ("detach", "_unsafe_view")

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in self._IGNORED:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def test_decode_step_ops_per_layer():
    """One T=1 decode step, one layer, fp32 on the CPU: the fused path's op budget.

    Before the fusion this was 41 ops (3 q/k/v GEMMs, RoPE as float/mul/neg/cat/mul/add per
    tensor, index_put_, a bool->additive mask conversion inside SDPA, mul+add residuals).
    On the CPU F.rms_norm still decomposes (pow/mean/add_/rsqrt/mul); on CUDA it is one kernel."""
    model = random_engine(tiny_config(scale_depth=1.4))  # residual_scale != 1 still one add
    model.setup_cache(1, 16)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), torch.arange(3))
        counter = _OpCounter()
        with counter:
            model(torch.tensor([[8]]), torch.tensor([3]))
    with torch.no_grad():
        pos = torch.tensor([4])
        h = model.tok_embeddings(torch.tensor([[9]]))
        mask = torch.where(model.causal_mask[pos], 0.0, -torch.inf)        # as Transformer.forward makes it
        args = (h, model.rope_cos[pos], model.rope_sin[pos], mask, pos)
        layer_counter = _OpCounter()
        with layer_counter:
            model.layers[0](*args)
    per_layer = layer_counter.ops
    report = str(dict(sorted(per_layer.items())))
    assert per_layer["mm"] + per_layer["addmm"] == 5, report            # qkv, wo, gate, up, down
    assert per_layer["index_copy_"] == 2 and per_layer["index_put_"] == 0, report
    assert per_layer["flip"] == 1 and per_layer["cat"] == per_layer["neg"] == 0, report   # one RoPE
    assert per_layer["where"] == per_layer["scalar_tensor"] == 0, report   # no per-layer mask conversion
    assert sum(per_layer.values()) <= 28, report   # mul+add residuals (scale 1.4 here) would exceed it
    # the whole step: the layers plus 14 per-step ops (embedding, 3 table lookups, the additive mask
    # (where + 2 host scalars), final norm 6, head)
    assert sum(counter.ops.values()) <= 2 * 28 + 14, str(dict(counter.ops))


# ----------------------------------------------------------------------------- GPU

def _decode_logits(model, ids: torch.Tensor, step=None, prompt_len: int = 8) -> torch.Tensor:
    """Prefill ids[:, :prompt_len], then one token at a time (through `step` if given); (T, V) fp32."""
    if step is None:
        model.setup_cache(1, 64)
    step = step or model
    dev = ids.device
    out = [model(ids[:, :prompt_len], torch.arange(prompt_len, device=dev))[0].float().clone()]
    for t in range(prompt_len, ids.shape[1]):
        out.append(step(ids[:, t:t + 1], torch.tensor([t], device=dev))[0].float().clone())
    return torch.cat(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@cuda_only
@pytest.mark.parametrize("bias", [False, True])
def test_cuda_half_logits_match_transformers(make_hf_model, bias):
    hf, path = make_hf_model(attention_bias=bias, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(3, 262, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits[0].float()                                     # transformers, fp32, CPU
        for dtype, tol in ((torch.float32, 1e-3), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)):
            ours = _decode_logits(load_model(path, device="cuda", dtype=dtype), ids.cuda()).cpu()
            assert _rel(ours, ref) < tol, f"{dtype}: relative error {_rel(ours, ref):.2e}"


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(make_hf_model, dtype):
    from hybrid_runtime.cuda_graph import GraphedDecodeStep
    _, path = make_hf_model(hidden_act="relu", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    model = load_model(path, device="cuda", dtype=dtype)
    ids = torch.randint(3, 262, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    eager = _decode_logits(model, ids)
    model.setup_cache(1, 64)
    graphed = _decode_logits(model, ids, step=GraphedDecodeStep(model, torch.device("cuda"), warmup_pos=63))
    diff = (graphed - eager).abs().max().item()
    assert _rel(graphed, eager) < 1e-3, f"max abs diff {diff:.3e}"
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1)), f"max abs diff {diff:.3e}"


@cuda_only
def test_cuda_kernels_per_decode_layer():
    """CUDA kernels one decode layer launches (a 7B-like MHA layer shape, bf16); printed with -s.

    Before the fusion: ~46-49 per layer (RMSNorm 8 kernels x2, three q/k/v GEMMs, RoPE 7 x2,
    index_put_, mask conversion in SDPA, mul+add residuals)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cfg = ModelConfig(dim=512, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=128, ffn_dim=1376, vocab_size=512)
    model = random_engine(cfg, dtype=torch.bfloat16).cuda()
    model.setup_cache(1, 256)
    pos = torch.tensor([7], device="cuda")
    with torch.inference_mode():
        model(torch.randint(0, 512, (1, 7), device="cuda"), torch.arange(7, device="cuda"))
        h = model.tok_embeddings(torch.tensor([[3]], device="cuda"))
        mask = torch.where(model.causal_mask[pos], 0.0, float("-inf")).to(h.dtype)
        args = (h, model.rope_cos[pos], model.rope_sin[pos], mask, pos)
        for _ in range(3):
            model.layers[0](*args)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.layers[0](*args)
            torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    print(f"\nCUDA kernels per decode layer: {len(kernels)}")
    for name in kernels:
        print("   ", name[:120])
    assert len(kernels) <= 32, "\n".join(kernels)
