"""A LLaMA-shaped ReLU model with realistic activation sparsity, built from a seed (no download),
then run through the project's own pipeline: profile -> train predictors -> pack.

Why a synthetic model: the benchmark must run on a 7B/13B shape on a machine with no network.
Random weights alone give ~50% sparsity with every neuron equally likely to fire; real ReLU
models (ProSparse-7B: ~89%) have a heavy-tailed per-neuron firing frequency, which is what the
hybrid runtime exploits (hot neurons on the GPU). The construction below gives exactly that.

Construction (all in `build_synthetic`, deterministic for a seed on a given device type):
- **Bias channel.** Channel 0 of the residual stream is a constant `bias_value`: every
  embedding row has it, and no layer writes to it (row 0 of `wo` and column 0 of `down` are
  zero). After the FFN's RMSNorm, x[0] = bias_value * w0 / rms(h) > 0, so gate column 0
  acts as a per-neuron bias ("biases in the weights", LLaMA has no bias terms).
- **Low-dimensional hidden states.** Everything written into the residual stream (embedding
  rows, columns of `wo`, rows of `down`) is sqrt(1 - noise^2) * (a vector in a fixed random
  `latent_dim`-dimensional subspace) + noise * (isotropic Gaussian), per-channel variance ~1.
  Hidden states of real LLMs are similarly concentrated; it is what lets a low-rank predictor
  work (rank ~2 x latent_dim explains the latent part of every gate pre-activation; the
  isotropic part, noise^2 of the variance, is what no low-rank predictor can see).
- **Target frequencies.** Per layer l a mean density m_l (uniform in mean_density * (1 +- spread),
  renormalised to average mean_density: 0.11 = 89% sparsity), and per neuron
  p_j = m_l * exp(sigma z_j - sigma^2 / 2), z_j ~ N(0, 1), clipped to max_freq: a log-normal,
  heavy-tailed profile (sigma = 1: the top 20% of neurons serve ~55% of the activations; PowerInfer
  reports 17-26% of neurons serving 80% in real ReLU models, their synthetic 7B used 32% -> 61%).
  Two presets (`SPARSITY_PROFILES`, `--sparsity-profile`): "prosparse" (mean density 0.11, sigma 1:
  ProSparse-7B's 89% sparsity) and "powerinfer" (mean density 0.16, sigma 0.80: the synthetic 7B
  behind the issue's PowerInfer figures, whose predictors mark ~24% of neurons active per token and
  whose top 32% of neurons serve 61% of the activations; see `SPARSITY_PROFILES` for the calibration).
- **Calibration on its own hidden states.** Layer by layer, on `calib_tokens` tokens of
  Zipf-distributed synthetic text: the attention output is rescaled to rms `branch_rms`; then with
  s_tj = gate_j[1:] . x_t[1:] and r_tj = (threshold - s_tj) / x_t[0], neuron j fires on token t
  iff gate_j[0] > r_tj, so gate_j[0] is set between the k-th and (k+1)-th smallest r_tj with
  k = round(p_j * N): the neuron fires on exactly k calibration tokens. The FFN output is then
  rescaled to rms `branch_rms` and the next layer sees the new hidden states.
- **Precision.** Weights are rounded to bf16 and stored as fp16 (every value is representable in
  both), so the pack step's fp16 -> bf16 conversion on the CPU is lossless and every system in
  the benchmark computes with the same weights.
- **Tokenizer.** A word-level tokenizer of `vocab_size` synthetic words (one token per word);
  calibration, profiling and benchmark prompts are Zipf-distributed word sequences from
  different seeds, so the profile measures the model on text it was not calibrated on.

Pipeline (`prepare_bench_model`): write an HF checkpoint (config.json, model.safetensors,
tokenizer), `convert.profile.run_profile` on synthetic text, `predictors.train.train_all` with one
fixed rank and few epochs (the time budget of one GPU call), `pack_hybrid_model`. A manifest
(`bench_model.json`) records every setting, measurement and phase time; a later call with the
same settings reuses the directory.

    python -m bench.synthetic --shape 7b --work /tmp/hybrid-bench   # build only
    python -m bench.synthetic --shape small --sparsity-profile powerinfer
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_runtime.errors import UserError, log  # noqa: E402

MANIFEST = "bench_model.json"
MANIFEST_VERSION = 1
GiB = 1024 ** 3

# Sparsity presets: SyntheticConfig overrides. "powerinfer" matches the synthetic 7B behind the issue's
# PowerInfer figures: predictors mark ~24% of neurons active per token; the top 32% of neurons serve
# 61% of the activations. How the two numbers were set (the 7B H100 run of 2026-11-23, prosparse preset,
# is the reference for how the pipeline moves them):
# - density: the profile on unseen text measured 0.126 for a 0.11 target (x1.146) and the rank-256
#   predictors marked 1.31x the true density, so a predicted 0.24 needs a true ~0.183, i.e. a target
#   mean density of 0.183 / 1.146 = 0.16;
# - skew: that profile's top-20% share was 0.538 for a target 0.556, i.e. unseen-text frequencies
#   regress toward the mean as f = 0.949 f_target + 0.051 mean; a measured top-32% share of 0.61
#   then needs a target share of 0.626, which `sigma_for_top_share("7b", 0.32, 0.626, 0.16)` puts at
#   sigma = 0.80 on this module's own frequency construction.
# Both are checked by measurement in every run: the results report the profile's density and top-32%
# share and the predictors' density next to the preset's targets.
SPARSITY_PROFILES: dict[str, dict] = {
    "prosparse": dict(mean_density=0.11, freq_sigma=1.0),
    "powerinfer": dict(mean_density=0.16, freq_sigma=0.80),
}
# what each preset stands for (the results print it beside the measured profile)
PROFILE_TARGETS: dict[str, dict] = {
    "prosparse": {"source": "ProSparse-7B (89% activation sparsity)", "sparsity": 0.89},
    "powerinfer": {"source": "PowerInfer's synthetic 7B behind the issue's PowerInfer figures",
                   "predicted_density": 0.24, "top32": 0.61},
}

# ----------------------------------------------------------------------------- configurations


@dataclass
class SyntheticConfig:
    """Shape and sparsity construction of the synthetic model (see the module docstring)."""
    name: str
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    vocab_size: int = 32000
    n_kv_heads: int = 0                 # 0: n_heads (LLaMA-2 7B/13B have no GQA)
    max_seq_len: int = 2048
    act: str = "relu"                   # relu, or fatrelu with act_threshold > 0 (transformers lacks fatrelu)
    act_threshold: float = 0.0
    mean_density: float = 0.11          # 1 - sparsity (ProSparse-7B: 89% sparsity)
    layer_density_spread: float = 0.2   # per-layer mean density in mean * (1 +- spread)
    freq_sigma: float = 1.0             # log-normal shape of the per-neuron frequencies
    max_freq: float = 0.95
    latent_dim: int = 0                 # 0: dim // 32
    noise: float = 0.22                 # std share of the isotropic part of residual writes
    bias_value: float = 4.0             # the constant of channel 0
    branch_rms: float = 0.3             # rms of each attention / FFN output
    calib_tokens: int = 2048
    calib_seq_len: int = 512
    seed: int = 0
    sparsity_profile: str = "prosparse"  # the SPARSITY_PROFILES preset the density/sigma came from ("custom")

    def __post_init__(self) -> None:
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.latent_dim == 0:
            self.latent_dim = max(8, self.dim // 32)
        if self.act not in ("relu", "fatrelu"):
            raise UserError(f"synthetic model: act must be relu or fatrelu, got {self.act!r}")
        if self.act == "fatrelu" and self.act_threshold <= 0:
            raise UserError("synthetic model: fatrelu needs act_threshold > 0")
        if not 0 < self.mean_density < self.max_freq <= 1:
            raise UserError("synthetic model: need 0 < mean_density < max_freq <= 1")
        if not self.freq_sigma >= 0:
            raise UserError(f"synthetic model: freq_sigma (--freq-sigma) must be >= 0, got {self.freq_sigma}")
        if self.calib_tokens < self.calib_seq_len or self.calib_seq_len < 2:
            raise UserError("synthetic model: calib_tokens must be >= calib_seq_len >= 2")
        if self.dim % self.n_heads:
            raise UserError(f"synthetic model: dim {self.dim} is not a multiple of n_heads {self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def n_params(self) -> int:
        d, f, L, V = self.dim, self.ffn_dim, self.n_layers, self.vocab_size
        kv = self.n_kv_heads * self.head_dim
        return 2 * V * d + d + L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d)


@dataclass
class PipelineConfig:
    """Profile / predictor settings sized for the time budget (not for best predictor quality)."""
    profile_tokens: int = 16384
    block_len: int = 512
    samples_per_layer: int = 8192
    rank: int = 0                       # 0: 2 * latent_dim
    max_epochs: int = 6                 # 3 epochs gave 3x the true density on `small`, 6 gave 1.9x
    recall_target: float = 0.95
    profile_batch: int = 8
    min_steps: int = 50                 # TrainConfig.min_steps: optimizer steps per epoch at least


SHAPES: dict[str, tuple[dict, dict]] = {
    # name: (SyntheticConfig fields, PipelineConfig fields)
    "7b": (dict(dim=4096, n_layers=32, n_heads=32, ffn_dim=11008), {}),
    "13b": (dict(dim=5120, n_layers=40, n_heads=40, ffn_dim=13824), {}),
    # ~1B parameters (TinyLlama-like, bf16 weights 1.9 GB: several times any CPU's L3): the CPU benchmark
    "1b": (dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048,
                calib_tokens=4096, calib_seq_len=256),
           dict(profile_tokens=4096, block_len=256, samples_per_layer=4096, max_epochs=4, profile_batch=4)),
    "small": (dict(dim=256, n_layers=4, n_heads=4, ffn_dim=688, vocab_size=4096, max_seq_len=1024,
                   calib_tokens=2048, calib_seq_len=256),
              dict(profile_tokens=4096, block_len=256, samples_per_layer=2048, max_epochs=3, profile_batch=4)),
    "tiny": (dict(dim=64, n_layers=2, n_heads=4, ffn_dim=176, vocab_size=512, max_seq_len=512,
                  calib_tokens=512, calib_seq_len=128, latent_dim=8),
             dict(profile_tokens=1024, block_len=128, samples_per_layer=512, max_epochs=2, profile_batch=4,
                  min_steps=10)),
}


def shape_configs(shape: str, seed: int = 0, sparsity_profile: str = "prosparse",
                  **overrides) -> tuple[SyntheticConfig, PipelineConfig]:
    """(SyntheticConfig, PipelineConfig) of a shape under a sparsity preset; `overrides` set fields of
    either (mean_density / freq_sigma overrides make the profile "<preset>+custom")."""
    if shape not in SHAPES:
        raise UserError(f"unknown synthetic shape {shape!r} (choose from {', '.join(SHAPES)})")
    if sparsity_profile not in SPARSITY_PROFILES:
        raise UserError(f"unknown sparsity profile {sparsity_profile!r} (choose from {', '.join(SPARSITY_PROFILES)})")
    model_kw, pipe_kw = SHAPES[shape]
    pipe_fields = set(PipelineConfig.__dataclass_fields__)
    syn_over = {k: v for k, v in overrides.items() if k not in pipe_fields}
    preset = SPARSITY_PROFILES[sparsity_profile]
    name = sparsity_profile
    if any(k in syn_over and syn_over[k] != v for k, v in preset.items()):
        name += "+custom"
    syn = SyntheticConfig(name=shape, seed=seed, **{**model_kw, **preset, "sparsity_profile": name, **syn_over})
    pipe = PipelineConfig(**{**pipe_kw, **{k: v for k, v in overrides.items() if k in pipe_fields}})
    if pipe.rank == 0:
        pipe.rank = 2 * syn.latent_dim
    return syn, pipe




# ----------------------------------------------------------------------------- text and tokenizer

_CONSONANTS = "bcdfghjklmnprstvwxyz"
_VOWELS = "aeiou"
SPECIALS = ("<unk>", "<s>", "</s>")     # ids 0, 1, 2 as in LLaMA


def synthetic_words(n: int) -> list[str]:
    """n distinct pronounceable lowercase words (2 syllables for the first 10000, then 3)."""
    syl = [c + v for c in _CONSONANTS for v in _VOWELS]   # 100 syllables
    words = []
    for i in range(n):
        if i < 10000:
            words.append(syl[i // 100] + syl[i % 100])
        else:
            j = i - 10000
            words.append(syl[(j // 10000) % 100] + syl[(j // 100) % 100] + syl[j % 100] + "n")
    return words


def build_word_tokenizer(out_dir: Path, vocab_size: int):
    """Word-level tokenizer: SPECIALS then vocab_size - 3 synthetic words; saved to out_dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w in synthetic_words(vocab_size - len(SPECIALS)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out_dir))
    return fast


def zipf_token_ids(n: int, vocab_size: int, seed: int, language_seed: int = 0,
                   exponent: float = 1.1) -> np.ndarray:
    """n word ids (>= 3, no specials) drawn from a Zipf-Mandelbrot distribution over the words.

    `language_seed` fixes which word has which frequency rank (the "language", shared by every
    stage); `seed` draws the sample (calibration, profile and prompts use different ones)."""
    n_words = vocab_size - len(SPECIALS)
    ranks = np.arange(n_words, dtype=np.float64)
    p = 1.0 / (ranks + 2.7) ** exponent
    p /= p.sum()
    word_of_rank = np.random.default_rng([language_seed, 7]).permutation(n_words)
    rng = np.random.default_rng([seed, 8])
    return word_of_rank[rng.choice(n_words, size=n, p=p)] + len(SPECIALS)


def write_synthetic_text(path: Path, n_words: int, vocab_size: int, seed: int, language_seed: int = 0) -> None:
    words = synthetic_words(vocab_size - len(SPECIALS))
    ids = zipf_token_ids(n_words, vocab_size, seed, language_seed)
    lines = [" ".join(words[i - len(SPECIALS)] for i in ids[k:k + 16]) for k in range(0, n_words, 16)]
    path.write_text("\n".join(lines) + "\n")


def prompt_token_ids(n: int, vocab_size: int, seed: int) -> list[int]:
    """The benchmark prompt: BOS + n - 1 Zipf words (a sample seed no other stage uses)."""
    return [1] + [int(t) for t in zipf_token_ids(n - 1, vocab_size, seed + 303, language_seed=seed)]


# ----------------------------------------------------------------------------- frequencies

def target_frequencies(cfg: SyntheticConfig) -> list[np.ndarray]:
    """Per layer (f,) target firing frequencies: log-normal around a per-layer mean (docstring)."""
    rng = np.random.default_rng([cfg.seed, 11])
    means = cfg.mean_density * (1 + cfg.layer_density_spread * rng.uniform(-1, 1, cfg.n_layers))
    means *= cfg.mean_density / means.mean()
    out = []
    for m in means:
        z = rng.standard_normal(cfg.ffn_dim)
        p = np.exp(cfg.freq_sigma * z)
        p *= m / p.mean()                    # exactly the layer's mean (before clipping)
        for _ in range(20):                  # clip, then rescale the unclipped ones to keep the mean
            p = np.minimum(p, cfg.max_freq)
            free = p < cfg.max_freq
            deficit = m * cfg.ffn_dim - p.sum()
            if deficit <= 1e-9 or not free.any():
                break
            p[free] *= 1 + deficit / p[free].sum()
        out.append(p.astype(np.float64))
    return out


def top_share(freq: np.ndarray, frac: float) -> float:
    """Share of all activations served by the `frac` most frequently firing neurons."""
    srt = np.sort(np.asarray(freq, np.float64))[::-1]
    k = max(1, int(round(frac * len(srt))))
    return float(srt[:k].sum() / max(srt.sum(), 1e-30))


def mean_top_share(cfg: SyntheticConfig, frac: float) -> float:
    """top_share(frac) of the target frequencies, averaged over the layers."""
    return float(np.mean([top_share(t, frac) for t in target_frequencies(cfg)]))


def sigma_for_top_share(shape: str, frac: float, share: float, mean_density: float, seed: int = 0) -> float:
    """The log-normal sigma whose target frequencies (this module's construction, this shape) put
    `share` of the activations on the top `frac` of the neurons: bisection (the share grows with sigma)."""
    lo, hi = 0.05, 3.0
    for _ in range(40):
        mid = (lo + hi) / 2
        syn, _ = shape_configs(shape, seed=seed, mean_density=mean_density, freq_sigma=mid)
        if mean_top_share(syn, frac) < share:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 4)


# ----------------------------------------------------------------------------- the model

def hf_config(cfg: SyntheticConfig) -> dict:
    c = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": cfg.act, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float16",
        "synthetic": {k: v for k, v in asdict(cfg).items()},
    }
    if cfg.act == "fatrelu":
        c["hidden_act_param"] = cfg.act_threshold
    return c


def _repr16(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to bf16 precision, store as `dtype` (exact in both fp16 and bf16, see docstring)."""
    return t.to(torch.bfloat16).to(dtype)


class _Rand:
    """Seeded Gaussian draws on the device (one stream per (seed, purpose, layer))."""

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device

    def randn(self, *shape, key: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + key)
        return torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32)


def _rms(t: torch.Tensor) -> float:
    return float(t[..., 1:].float().pow(2).mean().sqrt())


@torch.no_grad()
def build_synthetic(cfg: SyntheticConfig, device: torch.device | str, dtype: torch.dtype | None = None,
                    progress: bool = True):
    """Build and calibrate the model on `device`. Returns (Transformer, stats dict).

    dtype: the run dtype of the calibration forward (default fp16 on CUDA, fp32 on the CPU); the
    weights are bf16-representable in any case."""
    from hybrid_runtime.activations import Activation
    from hybrid_runtime.model import ModelConfig, Transformer

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    mcfg = ModelConfig.from_hf(hf_config(cfg))
    with torch.device("meta"):
        model = Transformer(mcfg)
    model = model.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    d, f, L, k = cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.latent_dim
    nu = cfg.noise
    rnd = _Rand(cfg.seed, device)
    basis, _ = torch.linalg.qr(rnd.randn(d - 1, k, key=1))          # (d-1, k) orthonormal
    basis = torch.cat([torch.zeros(1, k, device=device), basis])     # channel 0 untouched

    def residual_writes(n: int, key: int) -> torch.Tensor:
        """(n, d) vectors to add to the residual stream: latent + isotropic, channel 0 zero."""
        z = rnd.randn(n, k, key=key) @ basis.T * math.sqrt((d - 1) / k)   # (n, d)
        out = math.sqrt(1 - nu * nu) * z + nu * rnd.randn(n, d, key=key + 1)
        out[:, 0] = 0
        return out

    emb = residual_writes(cfg.vocab_size, key=10)
    emb[:, 0] = cfg.bias_value
    model.tok_embeddings.weight.copy_(_repr16(emb, dtype))
    del emb
    lm_head = rnd.randn(cfg.vocab_size, d, key=20) / math.sqrt(d)
    lm_head[:, 0] = 0
    model.output.weight.copy_(_repr16(lm_head, dtype))
    del lm_head
    model.norm.weight.fill_(1.0)
    hd_all = cfg.n_heads * cfg.head_dim
    for i, layer in enumerate(model.layers):
        base = 1000 * (i + 1)
        layer.attn_norm.weight.fill_(1.0)
        layer.ffn.norm.weight.fill_(1.0)
        a = layer.attn
        qkv = a.state_dict()   # on-disk names wq/wk/wv: views of the engine's (possibly fused) parameters
        for key, name in enumerate(("wq.weight", "wk.weight", "wv.weight"), start=1):
            w = qkv[name]
            w.copy_(_repr16(rnd.randn(*w.shape, key=base + key) / math.sqrt(d), dtype))
        a.wo.weight.copy_(_repr16(residual_writes(hd_all, key=base + 4).T / math.sqrt(hd_all), dtype))
        gate = rnd.randn(f, d, key=base + 6) / math.sqrt(d)
        gate[:, 0] = 0                                               # set by the calibration
        layer.ffn.gate.copy_(_repr16(gate, dtype))
        layer.ffn.up.copy_(_repr16(rnd.randn(f, d, key=base + 7) / math.sqrt(d), dtype))
        layer.ffn.down.copy_(_repr16(residual_writes(f, key=base + 8) / math.sqrt(f * cfg.mean_density), dtype))
        del gate
    t_init = time.perf_counter() - t0

    # --- calibration, layer by layer, on the model's own hidden states
    targets = target_frequencies(cfg)
    n_seq = cfg.calib_tokens // cfg.calib_seq_len
    T = cfg.calib_seq_len
    ids = zipf_token_ids(n_seq * T, cfg.vocab_size, cfg.seed + 101, cfg.seed).reshape(n_seq, T)
    ids[:, 0] = 1
    tokens = torch.as_tensor(ids, device=device)
    model.setup_cache(n_seq, T)
    pos = torch.arange(T, device=device)
    mask = model.causal_mask[pos]
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]
    thr = cfg.act_threshold
    activation = Activation(cfg.act, thr)
    h = model.tok_embeddings(tokens)                                   # (B, T, d)
    calib_density, calib_freqs = [], []
    it = range(L)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="calibrate", file=sys.stderr, leave=False)
    for i in it:
        layer = model.layers[i]
        attn_out = layer.attn(layer.attn_norm(h), cos, sin, mask, pos)
        layer.attn.wo.weight.mul_(cfg.branch_rms / max(_rms(attn_out), 1e-12))
        layer.attn.wo.weight.copy_(_repr16(layer.attn.wo.weight, dtype))
        h = h + layer.attn(layer.attn_norm(h), cos, sin, mask, pos)
        ffn = layer.ffn
        x = ffn.norm(h).reshape(-1, d).float()                        # (N, d)
        N = x.shape[0]
        s = x[:, 1:] @ ffn.gate[:, 1:].float().T                       # (N, f)
        r = (thr - s) / x[:, :1]                                       # fires iff gate[:, 0] > r
        del s
        r_sorted, _ = torch.sort(r, dim=0)                             # (N, f) ascending per neuron
        delta = r.std(dim=0, keepdim=True) + 1e-6
        del r
        pad = torch.cat([r_sorted[:1] - delta, r_sorted, r_sorted[-1:] + delta])  # (N + 2, f)
        del r_sorted
        kk = torch.as_tensor(np.rint(targets[i] * N).astype(np.int64), device=device).clamp_(0, N)
        cut = (pad.gather(0, kk[None]) + pad.gather(0, kk[None] + 1))[0] / 2      # (f,)
        del pad
        ffn.gate[:, 0] = _repr16(cut, dtype)
        xin = ffn.norm(h)
        g, u = F.linear(xin, ffn.gate), F.linear(xin, ffn.up)
        fired = activation.active(g, u).reshape(-1, f)
        freq = fired.float().mean(0)
        calib_freqs.append(freq.cpu().numpy())
        calib_density.append(float(freq.mean()))
        del g, u, fired, xin, x
        y = ffn(h)
        ffn.down.mul_(cfg.branch_rms / max(_rms(y), 1e-12))
        ffn.down.copy_(_repr16(ffn.down, dtype))
        h = h + ffn(h)
    for layer in model.layers:       # drop the calibration KV caches
        layer.attn.kv_cache = None
    del h, tokens
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats = {
        "seconds_init": round(t_init, 2), "seconds_calibrate": round(time.perf_counter() - t0 - t_init, 2),
        "calibration_tokens": n_seq * T,
        "target_density_per_layer": [float(t.mean()) for t in targets],
        "calibration_density_per_layer": calib_density,
        "calibration_sparsity": 1 - float(np.mean(calib_density)),
        "target_top20_share": float(np.mean([top_share(t, 0.2) for t in targets])),
        "calibration_top20_share": float(np.mean([top_share(fr, 0.2) for fr in calib_freqs])),
        "target_top32_share": float(np.mean([top_share(t, 0.32) for t in targets])),
        "calibration_top32_share": float(np.mean([top_share(fr, 0.32) for fr in calib_freqs])),
        "calibration_freq_corr": float(np.mean([np.corrcoef(t, fr)[0, 1] for t, fr in zip(targets, calib_freqs)])),
    }
    return model, stats


# ----------------------------------------------------------------------------- writing the checkpoint

_NATIVE_TO_HF = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]
_LAYER_NATIVE_TO_HF = [
    ("attn_norm.weight", "input_layernorm.weight"), ("attn.wq.weight", "self_attn.q_proj.weight"),
    ("attn.wk.weight", "self_attn.k_proj.weight"), ("attn.wv.weight", "self_attn.v_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"), ("ffn.norm.weight", "post_attention_layernorm.weight"),
    ("ffn.gate", "mlp.gate_proj.weight"), ("ffn.up", "mlp.up_proj.weight"), ("ffn.down", "mlp.down_proj.weight"),
]
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def hf_tensors(model) -> list[tuple[str, torch.Tensor, bool]]:
    """(HF name, native tensor, transpose?) for every weight, in file order."""
    params = model.state_dict()     # native on-disk names (q/k/v split), sharing the parameters' storage
    out = [(hf, params[n], False) for n, hf in _NATIVE_TO_HF]
    for i in range(len(model.layers)):
        for n, hf in _LAYER_NATIVE_TO_HF:
            out.append((f"model.layers.{i}.{hf}", params[f"layers.{i}.{n}"], n == "ffn.down"))
    return out


def write_safetensors_streaming(path: Path, tensors: list[tuple[str, torch.Tensor, bool]],
                                dtype: torch.dtype = torch.float16, metadata: dict | None = None) -> int:
    """Write a safetensors file tensor by tensor (device -> pinned host buffer -> file), without a
    whole-model host copy. `transpose` rows are written transposed. Returns the bytes written."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for name, t, tr in tensors:
        shape = list(t.shape[::-1]) if tr else list(t.shape)
        nbytes = t.numel() * torch.finfo(dtype).bits // 8
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    biggest = max(t.numel() for _, t, _ in tensors)
    on_cuda = any(t.is_cuda for _, t, _ in tensors)
    staging = torch.empty(biggest, dtype=dtype, pin_memory=on_cuda)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(len(hbytes).to_bytes(8, "little"))
        fh.write(hbytes)
        for _, t, tr in tensors:
            src = (t.t() if tr else t).to(dtype).contiguous()
            buf = staging[:t.numel()]
            buf.copy_(src.view(-1))
            fh.write(memoryview(buf.view(torch.uint8).numpy()))
            del src
    tmp.replace(path)
    return 8 + len(hbytes) + off


def write_hf_checkpoint(model, cfg: SyntheticConfig, out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    n = write_safetensors_streaming(out_dir / "model.safetensors", hf_tensors(model), torch.float16)
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, indent=2))
    build_word_tokenizer(out_dir, cfg.vocab_size)
    return n


# ----------------------------------------------------------------------------- disk

DISK_MARGIN = 256 * 1024 ** 2     # plus 2% of the write: file system slack, manifests, logs


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def disk_sizes(syn: SyntheticConfig, pipe: PipelineConfig) -> dict[str, int]:
    """Bytes each large write of the pipeline needs (estimates from the shape, within ~1%)."""
    weights = 2 * syn.n_params()                                          # fp16 on disk
    d, f, L, r = syn.dim, syn.ffn_dim, syn.n_layers, pipe.rank
    predictors = 4 * L * (r * d + r + f * r + f)                           # fp32 safetensors
    samples = pipe.samples_per_layer * L * (2 * d + (f + 7) // 8)          # bf16 x + packed mask
    return {"hf": weights + 2 * 1024 ** 2, "samples": samples, "hybrid": weights + predictors, "gguf": weights
            + 8 * 1024 ** 2}


def need_with_margin(nbytes: int) -> int:
    return int(nbytes * 1.02) + DISK_MARGIN


def check_disk(path: Path, nbytes: int, what: str) -> None:
    """UserError (one line: needed, free, what to do) unless `nbytes` (+ margin) fit at `path`."""
    need, free = need_with_margin(nbytes), free_bytes(path)
    if free < need:
        raise UserError(f"not enough disk for {what} in {path}: needs {need / GiB:.1f} GiB, {free / GiB:.1f} GiB "
                        "free (--clean-work removes other cached builds in --work; or point --work at a larger disk)")


WORK_DIR_RE = r"synthetic-[a-z0-9]+-s\d+-[0-9a-f]{16}"


def clean_work(work_root: Path, keep: Path | None) -> list[tuple[Path, int]]:
    """Remove the cached builds in `work_root` other than `keep`: directories named like
    `prepare_bench_model`'s (synthetic-<shape>-s<seed>-<16 hex>) and exported GGUFs under gguf/.
    Nothing else is touched. Returns (path, bytes freed) per removal."""
    import re
    root = Path(work_root).expanduser()
    if not root.is_dir():
        return []
    keep = Path(keep).resolve() if keep is not None else None
    victims = [p for p in sorted(root.iterdir()) if p.is_dir() and re.fullmatch(WORK_DIR_RE, p.name)
               and p.resolve() != keep]
    gguf = root / "gguf"
    if gguf.is_dir():
        victims += sorted(p for p in gguf.iterdir() if p.is_file() and (p.name.endswith(".gguf")
                                                                      or p.name.endswith(".gguf.source.json")))
    out = []
    for p in victims:
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        out.append((p, size))
    return out


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class BenchModel:
    """What the benchmark needs: the HF checkpoint, the hybrid directory, the prompt, the record."""
    work: Path
    hf_dir: Path
    hybrid_dir: Path
    manifest: dict = field(default_factory=dict)

    @property
    def synthetic(self) -> SyntheticConfig:
        return SyntheticConfig(**self.manifest["synthetic"])


def _fingerprint(syn: SyntheticConfig, pipe: PipelineConfig) -> str:
    blob = json.dumps({"v": MANIFEST_VERSION, "syn": asdict(syn), "pipe": asdict(pipe)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def work_dir(syn: SyntheticConfig, pipe: PipelineConfig, work_root: Path) -> Path:
    """Where prepare_bench_model builds (or finds) this configuration."""
    return Path(work_root) / f"synthetic-{syn.name}-s{syn.seed}-{_fingerprint(syn, pipe)}"


def prepare_bench_model(syn: SyntheticConfig, pipe: PipelineConfig, work_root: Path, device: torch.device | str,
                        rebuild: bool = False, progress: bool = True, on_phase=None,
                        before_pack=None) -> BenchModel:
    """Build (or reuse) the synthetic model and run profile -> train-predictors -> pack on it.

    on_phase(name, seconds) is called after every phase (the benchmark's log). before_pack(bm), when
    given, is called on a fresh build once the HF checkpoint is complete and the profile samples are
    deleted, before the hybrid directory is written (the benchmark runs disk-hungry systems there).
    Free disk is checked before the build (the peak: checkpoint + the larger of samples and hybrid
    directory) and before each large write: a UserError says what is needed and free."""
    device = torch.device(device)
    fp = _fingerprint(syn, pipe)
    work = work_dir(syn, pipe, work_root)
    man_path = work / MANIFEST
    bm = BenchModel(work, work / "hf", work / "hybrid")
    old = None
    if not rebuild and man_path.is_file():
        old = json.loads(man_path.read_text())
        if old.get("fingerprint") == fp and old.get("complete") and (bm.hybrid_dir / "hybrid.json").is_file():
            bm.manifest = old
            log(f"synthetic model: reusing {work} (built {old.get('created')})")
            return bm
    # an interrupted build of the same settings continues after its last finished phase (the checkpoint
    # written, then the profile's and the trainer's own checkpoints); anything else starts over
    resume = (old is not None and old.get("fingerprint") == fp and "write-checkpoint" in old.get("phases", {})
              and (bm.hf_dir / "model.safetensors").is_file())
    sizes = disk_sizes(syn, pipe)
    if resume:
        log(f"synthetic model: resuming the interrupted build in {work} after {', '.join(old['phases'])}")
        return _finish_build(syn, pipe, bm, device, old, sizes, progress, on_phase, before_pack)
    if work.exists():
        shutil.rmtree(work)
    peak = sizes["hf"] + max(sizes["samples"], sizes["hybrid"])
    check_disk(work, peak, f"the synthetic {syn.name} model (HF checkpoint {sizes['hf'] / GiB:.1f} GiB, then "
                           f"profile samples {sizes['samples'] / GiB:.1f} GiB, deleted after training, then the hybrid "
                           f"directory {sizes['hybrid'] / GiB:.1f} GiB)")
    work.mkdir(parents=True)
    phases: dict[str, float] = {}

    def phase_done(name: str, t0: float) -> None:
        phases[name] = round(time.perf_counter() - t0, 2)
        if on_phase:
            on_phase(name, phases[name])

    man: dict = {"format": "hybrid-bench-model", "version": MANIFEST_VERSION, "fingerprint": fp,
                 "created": time.strftime("%Y-%m-%d %H:%M:%S"), "synthetic": asdict(syn), "pipeline": asdict(pipe),
                 "device": str(device), "complete": False, "phases": phases,
                 "construction": __doc__.split("Construction")[1].split("Pipeline")[0].strip()}

    t0 = time.perf_counter()
    model, stats = build_synthetic(syn, device, progress=progress)
    man["build"] = stats
    phase_done("build+calibrate", t0)

    t0 = time.perf_counter()
    check_disk(work, sizes["hf"], "the HF checkpoint")
    nbytes = write_hf_checkpoint(model, syn, bm.hf_dir)
    man["checkpoint_bytes"] = nbytes
    data_dir = work / "data"
    data_dir.mkdir()
    calib_text = data_dir / "profile.txt"
    # enough words for profile_tokens after the 5% held-out split, plus a margin
    write_synthetic_text(calib_text, int(pipe.profile_tokens * 1.1) + 2 * pipe.block_len, syn.vocab_size,
                         syn.seed + 202, language_seed=syn.seed)
    phase_done("write-checkpoint", t0)
    _write_manifest(man_path, man)          # from here an interrupted build resumes (_finish_build)
    del model
    _free(device)
    return _finish_build(syn, pipe, bm, device, man, sizes, progress, on_phase, before_pack)


def _write_manifest(path: Path, man: dict) -> None:
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(man, indent=1))
    tmp.replace(path)


def _finish_build(syn, pipe, bm: BenchModel, device: torch.device, man: dict, sizes: dict, progress: bool,
                  on_phase, before_pack) -> BenchModel:
    """profile -> train-predictors -> pack on a written checkpoint; each step resumes from its own checkpoint
    (the profile's progress file, the trainer's finished layers) when a previous build was interrupted."""
    from convert.predictors_cli import summarize
    from convert.profile import ProfileConfig, run_profile
    from hybrid_runtime.hybrid_format import pack_hybrid_model
    from hybrid_runtime.loading import load_model
    from predictors.samples import SampleReader
    from predictors.train import TrainConfig, train_all
    work, man_path = bm.work, bm.work / MANIFEST
    calib_text = work / "data" / "profile.txt"
    phases = man["phases"] = dict(man.get("phases", {}))

    def phase_done(name: str, t0: float) -> None:
        phases[name] = round(time.perf_counter() - t0, 2)
        if on_phase:
            on_phase(name, phases[name])

    t0 = time.perf_counter()
    check_disk(work, sizes["samples"], "the profile samples")
    pcfg = ProfileConfig(tokens=pipe.profile_tokens, block_len=pipe.block_len, batch_size=pipe.profile_batch,
                         samples_per_layer=pipe.samples_per_layer, chunk_rows=max(1, pipe.samples_per_layer),
                         device=str(device), dtype="auto", progress=progress, checkpoint_seconds=1e9)
    prof = run_profile(str(bm.hf_dir), [str(calib_text)], str(work / "profile"), pcfg,
                       resume=(work / "profile").is_dir())
    _free(device)
    man["profile"] = {"tokens": prof["data"]["tokens"], "samples_per_layer": prof["samples"]["per_layer"],
                      "seconds": prof["seconds"],
                      "sparsity": float(np.mean([r["sparsity"] for r in prof["layers"]])),
                      "top10": float(np.mean([r["top10"] for r in prof["layers"]])),
                      "top20": float(np.mean([r["top20"] for r in prof["layers"]])),
                      "top50": float(np.mean([r["top50"] for r in prof["layers"]])),
                      "dead": int(sum(r["dead"] for r in prof["layers"])),
                      "layers": prof["layers"]}
    phase_done("profile", t0)

    t0 = time.perf_counter()
    reader = SampleReader(work / "profile" / "samples")
    tcfg = TrainConfig(recall_target=pipe.recall_target, ranks=(pipe.rank,), max_epochs=pipe.max_epochs,
                       min_steps=pipe.min_steps, input_kind="ffn_norm", device=str(device), progress=progress)
    # the FFN weights the trainer reads, in the build's run dtype (fp16 on CUDA, fp32 on the CPU)
    model = load_model(bm.hf_dir, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    ffns = [layer.ffn for layer in model.layers]
    pset, metrics = train_all(reader, ffns, tcfg, work / "predictors-partial",
                              resume=(work / "predictors-partial").is_dir())
    metrics["targets"] = {"recall": tcfg.recall_target, "density_factor": tcfg.density_factor,
                          "max_param_frac": tcfg.max_param_frac}
    summary = summarize(metrics, tcfg.recall_target, tcfg.density_factor, tcfg.max_param_frac)
    layers = metrics["layers"]
    man["predictors"] = {
        "rank": pipe.rank, "max_epochs": pipe.max_epochs, "input": metrics["input"],
        "recall_target": tcfg.recall_target, "summary": summary,
        "recall": float(np.mean([r["test"]["recall"] for r in layers])),
        "precision": float(np.mean([r["test"]["precision"] for r in layers])),
        "pred_density": float(np.mean([r["test"]["pred_density"] for r in layers])),
        "true_density": float(np.mean([r["test"]["true_density"] for r in layers])),
        "per_layer": [{k: r["test"][k] for k in ("recall", "precision", "pred_density", "true_density")}
                      for r in layers],
        "params": pset.n_params(),
    }
    (work / "predictor_metrics.json").write_text(json.dumps({**metrics, "summary": summary}, indent=1))
    shutil.rmtree(work / "predictors-partial", ignore_errors=True)
    del model, ffns, reader
    _free(device)
    shutil.rmtree(work / "profile" / "samples", ignore_errors=True)    # ~2.5 GB at 7B; only training reads them
    phase_done("train-predictors", t0)

    from safetensors.numpy import load_file
    freq = load_file(str(work / "profile" / "frequencies.safetensors"))["frequency"]   # (L, f)
    man["profile"]["top32"] = float(np.mean([top_share(freq[i], 0.32) for i in range(syn.n_layers)]))
    if before_pack is not None:
        before_pack(bm)

    t0 = time.perf_counter()
    check_disk(work, sizes["hybrid"], "the hybrid directory")
    layer_stats = [{"sparsity": r["sparsity"], "top20": r["top20"], **man["predictors"]["per_layer"][i]}
                   for i, r in enumerate(prof["layers"])]
    pack_hybrid_model(bm.hf_dir, bm.hybrid_dir, [freq[i] for i in range(syn.n_layers)], predictors=pset,
                      calibration={"data": "synthetic Zipf word text (bench/synthetic.py)",
                               "tokens": prof["data"]["tokens"], "profile": str(work / "profile")},
                      layer_stats=layer_stats)
    del pset
    gc.collect()
    phase_done("pack", t0)

    man["complete"] = True
    _write_manifest(man_path, man)
    bm.manifest = man
    return bm


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="Build the synthetic benchmark model and its hybrid directory.")
    ap.add_argument("--shape", default="small", choices=list(SHAPES))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "hybrid-runtime" / "bench"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparsity-profile", default="prosparse", choices=list(SPARSITY_PROFILES))
    ap.add_argument("--rebuild", action="store_true")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    syn, pipe = shape_configs(a.shape, seed=a.seed, sparsity_profile=a.sparsity_profile)
    t0 = time.perf_counter()
    bm = prepare_bench_model(syn, pipe, Path(a.work), dev, rebuild=a.rebuild,
                             on_phase=lambda n, s: log(f"[{time.perf_counter() - t0:7.1f}s] {n}: {s:.1f} s"))
    m = bm.manifest
    print(json.dumps({"hybrid_dir": str(bm.hybrid_dir), "hf_dir": str(bm.hf_dir), "build": m["build"],
                      "profile": {k: v for k, v in m["profile"].items() if k != "layers"},
                      "predictors": {k: v for k, v in m["predictors"].items() if k != "per_layer"},
                      "phases": m["phases"]}, indent=1))


if __name__ == "__main__":
    main()
