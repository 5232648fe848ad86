"""Dense reference engine for the LLaMA family (LLaMA, Mistral, ProSparse/ReluLLaMA, MiniCPM).

One file, read top to bottom like the papers: config -> RMSNorm -> RoPE -> attention with a
pre-allocated KV cache -> gated FFN (SiLU, ReLU, FATReLU, ReLU², dReLU) -> transformer.

Layout conventions (fixed at load time, never inside `forward`):
- FFN weights are neuron-major: `gate`, `up` and `down` are all (f, d); `down` is HF's
  `down_proj.weight` (d, f) transposed, so one neuron's three rows are contiguous. The hybrid
  runtime (hybrid_runtime/hybrid.py) slices exactly these tensors into hot and cold rows.
- Activations (what act(g) * u is, which neurons are active) live in hybrid_runtime/activations.py.
- Attention: q, k, v are one projection `wqkv` (rows q, k, v): batch-1 decode is launch-bound, so
  one GEMM, then one RoPE (HF's rotate-half) for q and k together. `state_dict()` and
  `load_state_dict()` speak the on-disk names `wq`, `wk`, `wv` (`fuse_qkv_`): files never see wqkv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_runtime.activations import Activation
from hybrid_runtime.errors import UserError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",      # mixture of experts: MoEFeedForward (the dense engine only, so far)
    "SparseLlamaForCausalLM",  # ProSparse releases (they ship modeling_sparsellama.py; not needed here)
    "MiniCPMForCausalLM",
)


@dataclass
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    head_dim: int = 0                 # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    act: str = "silu"
    act_threshold: float = 0.0        # FATReLU threshold (keep g >= t)
    attention_bias: bool = False
    sliding_window: int | None = None
    scale_emb: float = 1.0            # MiniCPM: embeddings * scale_emb
    scale_depth: float | None = None  # MiniCPM: residual branch * scale_depth / sqrt(n_layers)
    dim_model_base: int | None = None  # MiniCPM: logits from h / (dim / dim_model_base)
    n_experts: int = 0                # mixture of experts (Mixtral): experts per layer; 0: one dense FFN
    experts_per_token: int = 0        # the router's top-k
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # derived
    residual_scale: float = field(init=False)
    logit_scale: float = field(init=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        self.activation  # validates act and act_threshold (hybrid_runtime/activations.py)
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"num_attention_heads={self.n_heads} is not a multiple of "
                            f"num_key_value_heads={self.n_kv_heads}")
        self.residual_scale = (self.scale_depth / math.sqrt(self.n_layers)
                               if self.scale_depth is not None else 1.0)
        self.logit_scale = (self.dim_model_base / self.dim) if self.dim_model_base else 1.0

    @property
    def layer_neurons(self) -> int:
        """FFN neurons per layer: f, or E * f for a mixture of experts (numbered expert-major: expert e's
        neuron i is e * f + i; the profile's, the predictors' and the placement's view of an MoE layer)."""
        return self.ffn_dim * max(self.n_experts, 1)

    @property
    def activation(self) -> Activation:
        return Activation(self.act, self.act_threshold)

    def require_dense_ffn(self, what: str) -> None:
        """UserError for a mixture-of-experts model where only one dense FFN per layer is supported yet."""
        if self.n_experts:
            raise UserError(f"{what}: {self.architecture} (mixture of experts, {self.n_experts} experts) is not "
                            "supported here yet; this needs one dense FFN per layer")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; UserError names the offending field."""
        archs = hf.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise UserError(f"config.json: field 'architectures' must be a list of names, got {archs!r}")
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                       "mixtral": "MixtralForCausalLM",
                                       "minicpm": "MiniCPMForCausalLM"}.get(hf.get("model_type"), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"config.json: architecture {arch or hf.get('model_type')!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "vocab_size"):
            if not _is_int(hf.get(key)) or hf[key] <= 0:
                raise UserError(f"config.json: field {key!r} missing or not a positive integer")
        if hf.get("mlp_bias"):
            raise UserError("config.json: mlp_bias=true is not supported")
        activation = Activation.from_hf(hf.get("hidden_act", "silu"), hf.get("hidden_act_param"))
        # transformers >= 5 stores RoPE settings in `rope_parameters`; older configs use
        # `rope_theta` + `rope_scaling` (with "type" or "rope_type").
        rope = _field(hf, "rope_parameters", dict, {}) or {}
        rope = dict(rope)
        rope_theta = _number("rope_theta", rope.pop("rope_theta", hf.get("rope_theta", 10000.0)), positive=True)
        scaling = dict(_field(hf, "rope_scaling", dict, None) or {}) or rope
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type in ("default", None):
            scaling = None
        elif rope_type in ("linear", "llama3"):
            _number("rope_scaling.factor", scaling.get("factor"), positive=True)
            if rope_type == "llama3":
                _number("rope_scaling.original_max_position_embeddings",
                        scaling.get("original_max_position_embeddings"), positive=True)
                for k in ("low_freq_factor", "high_freq_factor"):
                    if k in scaling:
                        _number(f"rope_scaling.{k}", scaling[k], positive=True)
            scaling = {**scaling, "rope_type": rope_type}
        else:
            raise UserError(f"config.json: rope scaling type {rope_type!r} is not supported "
                            "(supported: default, linear, llama3)")
        eos = hf.get("eos_token_id")
        eos_ids = [eos] if _is_int(eos) else eos if isinstance(eos, list) else [] if eos is None else None
        if eos_ids is None or not all(_is_int(e) and e >= 0 for e in eos_ids):
            raise UserError(f"config.json: field 'eos_token_id' must be a token id or a list of them, got {eos!r}")
        bos = hf.get("bos_token_id")
        if bos is not None and not (_is_int(bos) and bos >= 0):
            raise UserError(f"config.json: field 'bos_token_id' must be a token id, got {bos!r}")
        n_heads = hf["num_attention_heads"]
        n_kv = _field(hf, "num_key_value_heads", int, None) or n_heads
        head_dim = _field(hf, "head_dim", int, None) or 0
        if n_kv <= 0 or head_dim < 0:
            raise UserError("config.json: fields 'num_key_value_heads' and 'head_dim' must be positive")
        if not head_dim and hf["hidden_size"] % n_heads:
            raise UserError(f"config.json: hidden_size {hf['hidden_size']} is not a multiple of "
                            f"num_attention_heads {n_heads} (and no head_dim is given)")
        sliding = _field(hf, "sliding_window", int, None) if arch in ("MistralForCausalLM", "MixtralForCausalLM") \
            else None
        if sliding is not None and sliding <= 0:
            raise UserError(f"config.json: field 'sliding_window' must be positive, got {sliding}")
        scale_depth = hf.get("scale_depth")
        dim_model_base = _field(hf, "dim_model_base", int, None)
        if dim_model_base is not None and dim_model_base <= 0:
            raise UserError(f"config.json: field 'dim_model_base' must be positive, got {dim_model_base}")
        n_experts, per_token = _experts(hf) if arch == "MixtralForCausalLM" else (0, 0)
        return cls(
            n_experts=n_experts, experts_per_token=per_token,
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=n_kv, ffn_dim=hf["intermediate_size"],
            vocab_size=hf["vocab_size"], head_dim=head_dim,
            norm_eps=_number("rms_norm_eps", hf.get("rms_norm_eps", 1e-5), positive=True),
            rope_theta=rope_theta, rope_scaling=scaling,
            max_seq_len=_field(hf, "max_position_embeddings", int, 2048, positive=True),
            tie_embeddings=_field(hf, "tie_word_embeddings", bool, arch == "MiniCPMForCausalLM"),
            act=activation.name, act_threshold=activation.threshold,
            attention_bias=_field(hf, "attention_bias", bool, False),
            sliding_window=sliding,
            scale_emb=_number("scale_emb", hf.get("scale_emb", 1.0) or 1.0, positive=True),
            scale_depth=None if scale_depth is None else _number("scale_depth", scale_depth, positive=True),
            dim_model_base=dim_model_base, architecture=arch,
            bos_token_id=bos, eos_token_ids=eos_ids,
        )


# routing features of other MoE families that Mixtral's router (softmax over all experts, top-k, top-k weights
# renormalised) does not have: a config that sets one is refused, naming the field
_UNSUPPORTED_ROUTING = ("n_shared_experts", "num_shared_experts", "shared_expert_intermediate_size",
                        "moe_intermediate_size", "topk_method", "scoring_func", "n_group", "topk_group",
                        "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step", "mlp_only_layers")


def _experts(hf: dict) -> tuple[int, int]:
    """(experts per layer, experts per token) of a Mixtral config; UserError names a bad or unsupported field."""
    for key in _UNSUPPORTED_ROUTING:
        if hf.get(key) not in (None, 0, [], False):
            raise UserError(f"config.json: field {key!r} (a routing feature other than Mixtral's top-k softmax "
                            f"router) is not supported")
    n = _field(hf, "num_local_experts", int, None, positive=True)
    k = _field(hf, "num_experts_per_tok", int, None, positive=True)
    if n is None or k is None:
        raise UserError("config.json: a MixtralForCausalLM needs positive integer fields 'num_local_experts' and "
                        "'num_experts_per_tok'")
    if k > n:
        raise UserError(f"config.json: field 'num_experts_per_tok' ({k}) is more than 'num_local_experts' ({n})")
    return n, k


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(key: str, v, positive: bool = False) -> float:
    """A config.json number (int or float, finite; > 0 if positive)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0):
        raise UserError(f"config.json: field {key!r} must be a {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def _field(hf: dict, key: str, kind: type, default, positive: bool = False):
    """hf[key] checked to be of `kind` (null counts as missing: the default)."""
    v = hf.get(key)
    if v is None:
        return default
    ok = _is_int(v) if kind is int else isinstance(v, kind)
    if not ok or (positive and v <= 0):
        what = {int: "an integer", bool: "true or false", dict: "an object"}[kind]
        raise UserError(f"config.json: field {key!r} must be {'a positive integer' if positive else what}, "
                        f"got {v!r}")
    return v


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF: normalise in fp32, cast to x's dtype, THEN the gain. F.rms_norm without a weight does the
        # first two (one kernel on CUDA; HF's own fp32 ops on the CPU); with it, the gain precedes the cast
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with linear or llama3 scaling applied."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.float()
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return (inv_freq / factor).float()
    # llama3: long wavelengths divided by factor, short kept, a smooth ramp in between
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin in fp32, cast back: x (..., hs) any float dtype (promoted
    exactly); cos, sin fp32, broadcastable. rotate_half(x) = [-x2, x1] keeps its sign in `sin` (first
    half negated, see setup_cache), so it is one flip of the halves; rounding as HF's (no FMA)."""
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)  # (..., hs): [x2, x1]
    return (x * cos + swapped * sin).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: (T,) distinct positions; k, v: (B, n_kv, T, hs) -> whole cache (B, n_kv, S, hs)
        self.k.index_copy_(2, input_pos, k)  # one kernel each (index_put_ with a tensor index: several)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


QKV_NAMES = ("wq", "wk", "wv")  # Attention.wqkv's row blocks, in order, under their on-disk names


def fuse_qkv_(state: dict[str, torch.Tensor], prefix: str) -> None:
    """In place: `{prefix}wq|wk|wv.{weight,bias}` -> `{prefix}wqkv.{weight,bias}` (rows q, k, v);
    an incomplete triple is left alone, so a strict load names what is missing."""
    for kind in ("weight", "bias"):
        names = [f"{prefix}{n}.{kind}" for n in QKV_NAMES]
        if all(n in state for n in names):
            state[f"{prefix}wqkv.{kind}"] = torch.cat([state.pop(n) for n in names])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv_sizes = (q, kv, kv)                  # rows of wq, wk, wv inside wqkv
        self.wqkv = nn.Linear(cfg.dim, q + 2 * kv, bias=bias)
        self.wo = nn.Linear(q, cfg.dim, bias=bias)
        self.kv_cache: KVCache | None = None
        # (de)serialise under the on-disk names wq/wk/wv: views out, concatenation in
        self.register_state_dict_post_hook(Attention._split_qkv)
        self.register_load_state_dict_pre_hook(Attention._fuse_qkv)

    def _fuse_qkv(self, state: dict[str, torch.Tensor], prefix: str, *_) -> None:
        fuse_qkv_(state, prefix)

    def _split_qkv(self, state: dict[str, torch.Tensor], prefix: str, *_) -> None:
        for kind in ("weight", "bias"):
            fused = state.pop(f"{prefix}wqkv.{kind}", None)
            if fused is not None:
                for name, part in zip(QKV_NAMES, fused.split(self.qkv_sizes)):
                    state[f"{prefix}{name}.{kind}"] = part

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                input_pos: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, hs)                             # (B, T, nh+2nkv, hs)
        qk = apply_rope(qkv[:, :, :nh + nkv], cos[:, None], sin[:, None])         # (B, T, nh+nkv, hs)
        q = qk[:, :, :nh].transpose(1, 2)                                           # (B, nh, T, hs)
        k, v = self.kv_cache.update(input_pos, qk[:, :, nh:].transpose(1, 2),
                                    qkv[:, :, nh + nkv:].transpose(1, 2))           # (B, nkv, S_max, hs)
        # mask: (T, S) over the first S cache slots (bool or additive); S is the whole pre-allocated cache
        # in a CUDA graph (no host sync on the length), the filled part when the caller knows it (kv_len)
        S = mask.shape[-1]
        k, v = k[:, :, :S], v[:, :, :S]                                             # (B, nkv, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, nh, T, hs)
        return self.wo(y.transpose(1, 2).reshape(B, T, nh * hs))


class FeedForward(nn.Module):
    """Gated FFN y = down^T · (act(gate·x) ⊙ up·x), x = norm(h); weights neuron-major (f, d).

    The dense FFN. A block's FFN is any module mapping the residual h (B, T, d) to the branch
    y (B, T, d) that owns its own norm: the hybrid runtime swaps in `hybrid.HybridFFN` (hot rows
    on the GPU, cold rows on the CPU); nothing else in the forward changes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate = nn.Parameter(torch.empty(cfg.ffn_dim, cfg.dim))  # (f, d)
        self.up = nn.Parameter(torch.empty(cfg.ffn_dim, cfg.dim))    # (f, d)
        self.down = nn.Parameter(torch.empty(cfg.ffn_dim, cfg.dim))  # (f, d) = down_proj.weight.T
        self.activation = cfg.activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)                                                   # (B, T, d)
        a = self.activation(F.linear(x, self.gate), F.linear(x, self.up))  # (B, T, f)
        return a @ self.down                                               # (B, T, d)


class Expert(nn.Module):
    """One expert's gated FFN rows, neuron-major like FeedForward's (f, d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(cfg.ffn_dim, cfg.dim))  # (f, d)
        self.up = nn.Parameter(torch.empty(cfg.ffn_dim, cfg.dim))    # (f, d)
        self.down = nn.Parameter(torch.empty(cfg.ffn_dim, cfg.dim))  # (f, d) = w2.T
        self.activation = cfg.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.activation(F.linear(x, self.gate), F.linear(x, self.up))  # (n, f)
        return a @ self.down                                               # (n, d)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's routing of x (N, d) by router (E, d): softmax over all experts in fp32, the top-k, their
    weights renormalised to sum 1 -> (weights (N, k) fp32, chosen experts (N, k))."""
    probs = F.softmax(F.linear(x, router).float(), dim=-1)                       # (N, E)
    weights, chosen = torch.topk(probs, top_k, dim=-1)                           # (N, k)
    return weights / weights.sum(dim=-1, keepdim=True), chosen


class MoEFeedForward(nn.Module):
    """Mixtral's sparse MoE FFN: router logits -> softmax over all experts (fp32) -> top-k -> the k weights
    renormalised to sum 1; each token's output is the weighted sum of its k experts' gated FFNs.

    Experts run one at a time over the tokens routed to them, in expert order, and their outputs are
    added per token in that order (as transformers does, so fp32 results match it bit for bit)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.router = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim))   # (E, d)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.n_experts))
        self.top_k = cfg.experts_per_token
        self.activation = cfg.activation

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) bool: the experts each token of x = norm(h) (N, d) is routed to (router moved to x's device
        and dtype: the profile and the predictor trainer ask on their own devices)."""
        _, chosen = route(x, self.router.to(x), self.top_k)                      # (N, k)
        return (chosen[:, :, None] == torch.arange(len(self.experts), device=x.device)).any(dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, d = h.shape
        x = self.norm(h).view(B * T, d)                                           # (N, d)
        weights, chosen = route(x, self.router, self.top_k)                      # (N, k), (N, k)
        y = torch.zeros_like(x)
        # deliberate host sync: which experts got tokens, and which tokens (data-dependent shapes)
        hit = torch.bincount(chosen.flatten(), minlength=len(self.experts)).nonzero().flatten().tolist()
        for e in hit:
            token, slot = torch.where(chosen == e)                               # (n_e,), (n_e,)
            y.index_add_(0, token, (self.experts[e](x[token]) * weights[token, slot, None]).to(y.dtype))
        return y.view(B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        # the hybrid runtime swaps this module
        self.ffn: nn.Module = MoEFeedForward(cfg) if cfg.n_experts else FeedForward(cfg)
        self.residual_scale = cfg.residual_scale

    def attend(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               input_pos: torch.Tensor) -> torch.Tensor:
        """h + attention branch: the FFN's input (the hybrid CUDA graphs capture this half alone)."""
        return self.add_branch(h, self.attn(self.attn_norm(h), cos, sin, mask, input_pos))

    def add_branch(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # h + branch * residual_scale as one kernel (MiniCPM's scale; 1.0 elsewhere)
        return torch.add(h, y, alpha=self.residual_scale)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                input_pos: torch.Tensor) -> torch.Tensor:
        h = self.attend(h, cos, sin, mask, input_pos)
        return self.add_branch(h, self.ffn(h))


class Transformer(nn.Module):
    """embed -> layers -> head. `forward` is the only decode step; the CUDA-graph steps
    (cuda_graph.py, hybrid_graph.py) replay these same methods."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.max_seq_len = 0

    def setup_cache(self, max_batch: int, max_seq_len: int) -> None:
        """Pre-allocate each layer's KV cache where that layer's attention weights live (device and
        dtype), and the RoPE tables and causal mask on the embeddings' device."""
        cfg = self.config
        device = self.tok_embeddings.weight.device
        self.max_seq_len = max_seq_len
        for layer in self.layers:
            w = getattr(layer.attn.wqkv, "weight", None)
            if w is None:                 # block-quantized matrices (quant.BlockLinear): the norm's dtype is the run's
                w = layer.attn_norm.weight
            layer.attn.kv_cache = KVCache(max_batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim,
                                          w.dtype, w.device)
        inv_freq = rope_inv_freq(cfg).to(device)
        t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)                       # (S, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)                # (S, hs)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)
        self.rope_sin[:, :cfg.head_dim // 2].neg_()            # rotate_half's sign (see apply_rope)
        pos = torch.arange(max_seq_len, device=device)
        allowed = pos[None, :] <= pos[:, None]                 # (S, S) causal
        if cfg.sliding_window:
            allowed &= pos[None, :] > pos[:, None] - cfg.sliding_window
        self.register_buffer("causal_mask", allowed, persistent=False)

    def embed(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None):
        """tokens (B, T) at positions input_pos (T,) -> (h (B, T, d), cos, sin (T, hs), mask (T, S)).

        kv_len: how many cache slots are filled after this step (the host knows it when it decodes
        eagerly); attention then reads only those, S = kv_len. None: the whole cache (CUDA graphs)."""
        cfg = self.config
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (T, hs)
        h = self.tok_embeddings(tokens)                        # (B, T, d)
        allowed = self.causal_mask[input_pos] if kv_len is None else self.causal_mask[input_pos, :kv_len]
        # additive mask made once per step: SDPA converts a bool mask in every layer (3 kernels)
        mask = torch.where(allowed, 0.0, -math.inf).to(h.dtype)  # (T, S)
        if cfg.scale_emb != 1.0:
            h = h * cfg.scale_emb
        return h, cos, sin, mask

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: h (B, T, d) -> logits (B, T, V) in fp32."""
        h = self.norm(h)
        if self.config.logit_scale != 1.0:
            h = h * self.config.logit_scale
        return self.output(h).float()

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """tokens (B, T) at positions input_pos (T,) -> logits (B, T, V) in fp32 (kv_len: see embed)."""
        h, cos, sin, mask = self.embed(tokens, input_pos, kv_len)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, input_pos)
        return self.head(h)

    def param_count(self) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
