"""Activation profiling: which FFN neurons fire, how often, and (x, active) samples for predictors.

Calibration text is tokenized and packed into blocks (`convert.data.load_token_blocks`) and run
through the dense engine. A forward hook on every `model.layers[i].ffn` sees the residual stream h
(the FFN's input); it computes x = ffn.norm(h), g = x gate^T, u = x up^T and the active mask:
  - ReLU-family models (relu, fatrelu, relu2, drelu): the activation's `active(g, u)`
    (hybrid_runtime/activations.py), i.e. the activation is exactly non-zero;
  - any model with `cett` set: by output magnitude as in the ReLU² paper: neuron i's magnitude is
    |a_i| * ||down_i||, active iff magnitude > eps_l, with eps_l per layer chosen by bisection on the
    first `cett_tokens` tokens so that the mean over tokens of CETT(eps) = ||sum_{mag <= eps} a_i down_i||
    / ||sum_i a_i down_i|| equals `cett` (e.g. 0.2). A SiLU model without `cett` is an error.
Per-neuron counts accumulate on the device. A fixed random subset of token positions (the same for
every layer, `samples_per_layer` of them) is written to the sample store as (h, mask) pairs
(predictors.samples, x_kind "residual": the trainer derives ffn_norm(h) itself).

When the data holds fewer tokens than asked, everything available is profiled and a note says so
(the count used is recorded in profile.json); data with no full block is an error.

Output directory:
  profile.json              {"format": "hybrid-profile", "version": 1, "model": dir, "model_config": {dim,
                            ffn_dim, n_layers, act, act_threshold, architecture}, "data": {files, tokens (used),
                            tokens_requested, block_len, blocks, split}, "activity": {"kind": "exact_zero",
                            act, threshold} or {"kind": "magnitude", cett, cett_tokens, magnitude_thresholds
                            [L]}, "samples": {dir, per_layer, x_kind, x_dtype}, "frequencies": file name,
                            "settings", "fingerprint" (for resume), "seconds", "layers": [{layer, density,
                            sparsity, top10, top20, top50 (share of all activations on the top 10/20/50%
                            most frequent neurons), dead (never-active neurons)}]}
  frequencies.safetensors   `counts` (L, f) int64 active-token counts, `frequency` (L, f) float32 =
                            counts / n_tokens; metadata `n_tokens`
  samples/                  the sample store (predictors/samples.py)
  progress.safetensors      checkpoint while running (counts + metadata), removed when done
Checkpoints: when the run starts, every `checkpoint_seconds`, and on Ctrl-C / SIGTERM (at the end of
the batch in flight). Resume (`resume=True`, `--resume`) continues from the last checkpoint; chunks
written after it are dropped and recomputed, so nothing is lost or duplicated, and the result is the
same as an uninterrupted run's.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hybrid_runtime.activations import cett_threshold, magnitude_active
from hybrid_runtime.errors import GracefulStop, UserError, check_number, check_output_path, log, prepare_output_dir
from predictors.samples import SampleWriter

FORMAT_NAME = "hybrid-profile"
FORMAT_VERSION = 1
TOP_SHARES = (0.1, 0.2, 0.5)


@dataclass
class ProfileConfig:
    tokens: int = 1_000_000
    block_len: int = 512
    split: str = "train"                # convert.data split: calibration stays off the held-out text
    batch_size: int = 8                 # blocks per forward
    samples_per_layer: int = 65536
    chunk_rows: int = 1024
    x_dtype: str = "bfloat16"
    cett: float | None = None           # magnitude-based activity (ReLU² paper's CETT target)
    cett_tokens: int = 2048
    seed: int = 0
    checkpoint_seconds: float = 120.0
    device: str = "cpu"
    dtype: str = "auto"
    progress: bool = True




def coverage_summary(counts: np.ndarray, n_tokens: int) -> dict:
    """Per-layer numbers for the table: density, sparsity, share of activations on the top neurons."""
    f = len(counts)
    total = int(counts.sum())
    srt = np.sort(counts)[::-1]
    out = {"density": total / (n_tokens * f) if n_tokens else 0.0}
    out["sparsity"] = 1.0 - out["density"]
    for s in TOP_SHARES:
        k = max(1, int(round(s * f)))
        out[f"top{int(s * 100)}"] = float(srt[:k].sum() / total) if total else 0.0
    out["dead"] = int((counts == 0).sum())
    return out


# ----------------------------------------------------------------------------- the run

def _fingerprint(cfg_model, files: list[Path], pcfg: ProfileConfig) -> dict:
    return {
        "model": {"dim": cfg_model.dim, "ffn_dim": cfg_model.ffn_dim, "n_layers": cfg_model.n_layers,
                  "act": cfg_model.act, "act_threshold": cfg_model.act_threshold},
        "data": [{"file": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
        "settings": {"tokens": pcfg.tokens, "block_len": pcfg.block_len, "split": pcfg.split, "samples_per_layer": pcfg.samples_per_layer,
                     "x_dtype": pcfg.x_dtype, "cett": pcfg.cett, "cett_tokens": pcfg.cett_tokens, "seed": pcfg.seed,
                     "chunk_rows": pcfg.chunk_rows},
    }


def _check_same(old: dict, new: dict, out: Path) -> None:
    om, nm = old["model"], new["model"]
    shape = ("n_layers", "dim", "ffn_dim")
    if any(om[k] != nm[k] for k in shape):
        raise UserError(f"{out}: profile was made for another model (n_layers, dim, ffn_dim = "
                        f"{tuple(om[k] for k in shape)}, this model has {tuple(nm[k] for k in shape)}); "
                        "use another --out or --force")
    for section in ("model", "data", "settings"):
        if old[section] != new[section]:
            if isinstance(old[section], dict):
                diff = [k for k in new[section] if old[section].get(k) != new[section][k]]
            else:
                diff = ["files or their sizes"]
            raise UserError(f"{out}: cannot resume, {section} differs from the interrupted run "
                            f"({', '.join(diff)}); rerun with the same arguments or use --force")


def _load_progress(path: Path) -> tuple[dict, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["state"])
            counts = fh.get_tensor("counts")
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({e}); restart with --force") from None
    return meta, counts


def _save_progress(path: Path, counts: torch.Tensor, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({"counts": counts.cpu().contiguous()}, str(tmp), metadata={"state": json.dumps(state)})
    tmp.replace(path)


def check_profile_inputs(model_path: str, data_files: list[str], out_dir: str | None, pcfg: ProfileConfig):
    """Everything a profile run is given, checked before any work: (model directory, data files, out)."""
    from hybrid_runtime.loading import parse_dtype, resolve_model
    from hybrid_runtime.model_dir import open_model_dir
    if pcfg.tokens <= 0:
        raise UserError(f"--tokens must be positive, got {pcfg.tokens}")
    if pcfg.samples_per_layer < 0:
        raise UserError(f"--samples-per-layer must be >= 0, got {pcfg.samples_per_layer}")
    check_number("--cett", pcfg.cett, low=0, high=1, low_open=True, high_open=True)
    for name, v in (("--block-len", pcfg.block_len), ("--batch-size", pcfg.batch_size),
                    ("--cett-tokens", pcfg.cett_tokens), ("--chunk-rows", pcfg.chunk_rows)):
        if v <= 0:
            raise UserError(f"{name} must be positive, got {v}")
    parse_dtype(pcfg.dtype)
    files = [Path(f) for f in data_files]
    if not files:
        raise UserError("no --data files given")
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: data file not found")
    model_dir = resolve_model(model_path)
    md = open_model_dir(model_dir)
    mcfg = md.config
    if mcfg.n_experts and pcfg.cett is not None:
        raise UserError("--cett: magnitude activity is defined for one dense FFN per layer; this model has "
                        f"{mcfg.n_experts} experts (convert it to ReLU/dReLU experts with `hybrid-convert prosparse`)")
    out = None if out_dir is None else \
        check_output_path(out_dir, [("--model", model_dir), *(("--data", f) for f in files)])
    if pcfg.cett is not None and mcfg.act != "silu":
        raise UserError(f"--cett defines active neurons by output magnitude, for SiLU models; this model is "
                        f"{mcfg.act}, whose inactive neurons are exact zeros already: drop --cett")
    if mcfg.n_experts and not mcfg.activation.has_exact_zeros:
        raise UserError(f"{model_dir}: its experts use {mcfg.act!r} (no exact zeros); convert them to ReLU or dReLU "
                        "experts first: hybrid-convert prosparse --activation relu|drelu")
    if pcfg.cett is None and not mcfg.activation.has_exact_zeros:
        raise UserError(f"{model_dir}: activation {mcfg.act!r} has no exact zeros; pass --cett 0.2 to define "
                        "active neurons by output magnitude (ReLU² paper's CETT), or convert it with ProSparse first")
    if pcfg.block_len > mcfg.max_seq_len:
        raise UserError(f"--block-len {pcfg.block_len} exceeds the model's max_position_embeddings {mcfg.max_seq_len}")
    return md, files, out


def active_mask(ffn, x: torch.Tensor) -> torch.Tensor:
    """Which neurons of a layer are active for each token of x = ffn_norm(h) (N, d): (N, f) bool for a dense
    FFN; for a mixture of experts (N, E * f), expert-major (expert e's neuron i is column e * f + i), True only
    in the token's routed experts (the router as the engine computes it, `model.route`)."""
    from hybrid_runtime.model import MoEFeedForward
    if not isinstance(ffn, MoEFeedForward):
        return ffn.activation.active(F.linear(x, ffn.gate), F.linear(x, ffn.up))
    hit = ffn.routed(x)                                               # (N, E)
    n_exp, f = len(ffn.experts), ffn.experts[0].gate.shape[0]
    mask = torch.zeros(x.shape[0], n_exp, f, dtype=torch.bool, device=x.device)
    for e, expert in enumerate(ffn.experts):
        token = hit[:, e].nonzero().squeeze(1)                        # (n_e,)
        if token.numel():
            xe = x[token]
            mask[token, e] = expert.activation.active(F.linear(xe, expert.gate), F.linear(xe, expert.up))
    return mask.view(x.shape[0], n_exp * f)


def run_profile(model_path: str, data_files: list[str], out_dir: str, pcfg: ProfileConfig,
                resume: bool = False, force: bool = False) -> dict:
    """Profile a model; returns the profile.json dict. See the module docstring for the outputs."""
    from convert.data import load_token_blocks
    from hybrid_runtime.loading import load_model, load_tokenizer, parse_dtype

    md, files, out = check_profile_inputs(model_path, data_files, out_dir, pcfg)
    model_dir, mcfg, run_dtype = md.path, md.config, parse_dtype(pcfg.dtype)
    fp = _fingerprint(mcfg, files, pcfg)
    progress_path, profile_path = out / "progress.safetensors", out / "profile.json"
    state, counts = None, None
    if resume and profile_path.is_file():
        old = json.loads(profile_path.read_text())
        _check_same(old["fingerprint"], fp, out)
        log(f"{out}: profile already complete, nothing to resume")
        return old
    if resume and progress_path.is_file():
        state, counts = _load_progress(progress_path)
        _check_same(state["fingerprint"], fp, out)
        log(f"resuming {out} after {state['blocks_done']} blocks")
    elif resume and out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: not empty and has no checkpoint (progress.safetensors) to resume; use --force")
    else:
        prepare_output_dir(out, force)

    device = torch.device(pcfg.device)
    model = load_model(md, device=device, dtype=run_dtype)
    tokenizer = load_tokenizer(model_dir)
    blocks = torch.as_tensor(load_token_blocks([str(f) for f in files], tokenizer, pcfg.block_len,
                                               pcfg.split, pcfg.tokens))
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise UserError(f"data files give no full block of {pcfg.block_len} tokens: nothing to profile")
    n_blocks, T = blocks.shape
    n_tokens = n_blocks * T
    if n_blocks < pcfg.tokens // T:  # (a request that is not a multiple of block_len is rounded down)
        log(f"note: the data holds only {n_tokens} tokens in {n_blocks} blocks of {T} "
            f"(asked for {pcfg.tokens}); profiling all of them")
    # a mixture of experts is profiled as one FFN of E * f neurons, expert-major (see _active_mask)
    L, d, f = mcfg.n_layers, mcfg.dim, mcfg.layer_neurons

    # which token positions (flat over the blocks) become samples: fixed by the seed, so resumable
    k = min(pcfg.samples_per_layer, n_tokens)
    chosen = np.zeros(n_tokens, dtype=bool)
    chosen[np.random.default_rng(pcfg.seed).choice(n_tokens, k, replace=False)] = True
    chosen = torch.from_numpy(chosen)

    # activity definition
    ffns = [layer.ffn for layer in model.layers]
    if pcfg.cett is not None:
        eps = state["eps"] if state else _calibrate_cett(model, ffns, blocks, pcfg)
        down_norms = [ffn.down.float().norm(dim=1) for ffn in ffns]  # (f,) each
    else:
        eps = None

    writer = SampleWriter(out / "samples", L, d, f, x_dtype=pcfg.x_dtype, x_kind="residual",
                          chunk_rows=pcfg.chunk_rows, resume=state is not None,
                          keep_chunks=state["chunks"] if state else None)
    counts = counts.to(device) if counts is not None else torch.zeros(L, f, dtype=torch.int64, device=device)
    blocks_done = state["blocks_done"] if state else 0
    seconds_before = state["seconds"] if state else 0.0

    batch_sel: list[torch.Tensor] = [torch.empty(0)]  # sampled row indices into the batch's (B*T) tokens

    def hook(i: int, ffn, args, output) -> None:
        h = args[0]                                                   # (B, T, d)
        x = ffn.norm(h).reshape(-1, d)                                # (B*T, d)
        if eps is None:
            mask = active_mask(ffn, x)                                # (B*T, f)
        else:
            g, u = F.linear(x, ffn.gate), F.linear(x, ffn.up)         # (B*T, f)
            mask = magnitude_active(ffn.activation(g.float(), u.float()), down_norms[i], eps[i])
        counts[i] += mask.sum(0)
        rows = batch_sel[0]
        if len(rows):
            writer.append(i, h.reshape(-1, d)[rows], mask[rows])

    handles = [ffn.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i, ffn in enumerate(ffns)]
    t0, last_ckpt = time.perf_counter(), time.perf_counter()
    bar = tqdm(total=n_tokens, initial=blocks_done * T, unit="tok", desc="profile", disable=not pcfg.progress,
               file=sys.stderr, dynamic_ncols=True)

    def checkpoint() -> None:
        writer.flush()
        _save_progress(progress_path, counts, {
            "fingerprint": fp, "blocks_done": blocks_done, "chunks": writer.committed_chunks(),
            "eps": eps, "seconds": seconds_before + time.perf_counter() - t0})

    cache_batch = 0
    try:
        with torch.inference_mode(), GracefulStop() as stop:
            if state is None:
                checkpoint()     # from here on every interruption is resumable (--resume)
            while blocks_done < n_blocks:
                toks = blocks[blocks_done:blocks_done + pcfg.batch_size].to(device)  # (B, T)
                B = toks.shape[0]
                if B != cache_batch:
                    model.setup_cache(B, T)
                    cache_batch = B
                batch_sel[0] = chosen[blocks_done * T:(blocks_done + B) * T].nonzero().squeeze(1).to(device)
                model(toks, torch.arange(T, device=device))
                blocks_done += B
                bar.update(B * T)
                dens = float(counts.sum()) / (blocks_done * T * L * f)
                bar.set_postfix(density=f"{dens:.4f}", samples=writer.rows(0))
                if stop.requested:   # Ctrl-C / SIGTERM: keep everything up to this batch
                    checkpoint()
                    log(f"profile stopped after {blocks_done} of {n_blocks} blocks; continue with --resume")
                    raise KeyboardInterrupt
                if time.perf_counter() - last_ckpt > pcfg.checkpoint_seconds:
                    checkpoint()
                    last_ckpt = time.perf_counter()
        checkpoint()
    finally:
        bar.close()
        for h in handles:
            h.remove()

    counts_np = counts.cpu().numpy()
    save_file({"counts": counts.cpu().contiguous(), "frequency": (counts.double() / n_tokens).float().cpu()},
              str(out / "frequencies.safetensors"), metadata={"n_tokens": str(n_tokens)})
    layers = [{"layer": i, **coverage_summary(counts_np[i], n_tokens)} for i in range(L)]
    profile = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "model": str(model_dir.resolve()),
        "model_config": {"dim": d, "ffn_dim": f, "n_experts": mcfg.n_experts, "expert_ffn_dim": mcfg.ffn_dim,
                         "n_layers": L, "act": mcfg.act,
                         "act_threshold": mcfg.act_threshold, "architecture": mcfg.architecture},
        "data": {"files": [str(p) for p in files], "tokens": n_tokens, "tokens_requested": pcfg.tokens,
                 "block_len": T, "blocks": n_blocks, "split": pcfg.split},
        "activity": ({"kind": "exact_zero", "act": mcfg.act, "threshold": mcfg.act_threshold} if eps is None else
                     {"kind": "magnitude", "cett": pcfg.cett, "cett_tokens": pcfg.cett_tokens,
                      "magnitude_thresholds": eps}),
        "samples": {"dir": "samples", "per_layer": k, "x_kind": "residual", "x_dtype": pcfg.x_dtype},
        "frequencies": "frequencies.safetensors",
        "settings": {k2: v for k2, v in asdict(pcfg).items() if k2 != "progress"},
        "fingerprint": fp,
        "seconds": round(seconds_before + time.perf_counter() - t0, 2),
        "layers": layers,
    }
    tmp = profile_path.with_name("profile.json.tmp")
    tmp.write_text(json.dumps(profile, indent=1))
    tmp.replace(profile_path)
    progress_path.unlink(missing_ok=True)
    return profile


@torch.no_grad()
def _calibrate_cett(model, ffns, blocks: torch.Tensor, pcfg: ProfileConfig) -> list[float]:
    """One forward over the first cett_tokens tokens; each layer's hook bisects its own eps."""
    T = blocks.shape[1]
    n = max(1, min(len(blocks), math.ceil(pcfg.cett_tokens / T)))
    eps: list[float | None] = [None] * len(ffns)

    def hook(i, ffn, args, output):
        x = ffn.norm(args[0])
        a = ffn.activation(F.linear(x, ffn.gate), F.linear(x, ffn.up)).reshape(-1, ffn.gate.shape[0])
        eps[i] = cett_threshold(a, ffn.down, pcfg.cett)[0]

    handles = [ffn.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i, ffn in enumerate(ffns)]
    try:
        device = next(model.parameters()).device
        model.setup_cache(n, T)
        model(blocks[:n].to(device), torch.arange(T, device=device))
    finally:
        for h in handles:
            h.remove()
    log("CETT magnitude thresholds per layer: " + ", ".join(f"{e:.4g}" for e in eps))
    return eps


def format_profile_table(profile: dict) -> str:
    rows = ["layer  sparsity  density   top10%  top20%  top50%   dead"]
    for r in profile["layers"]:
        rows.append(f"{r['layer']:5d}  {r['sparsity']:8.4f}  {r['density']:7.4f}  {r['top10']:6.3f}  "
                    f"{r['top20']:6.3f}  {r['top50']:6.3f}  {r['dead']:5d}")
    return "\n".join(rows)
