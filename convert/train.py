"""The training loop shared by ProSparse conversion and from-scratch pretraining of small LLaMAs.

`train(model, blocks, cfg, shaping)` trains any HF causal LM on packed token blocks:
AdamW, linear warm-up + cosine LR, gradient accumulation, bf16 autocast and (optionally)
gradient checkpointing on CUDA, fp32 on CPU, a tqdm bar with loss / L1 / lambda / sparsity.
`shaping` says what is added to the LM loss (ProSparse: lambda(step) * sum of per-layer L1
of x1); without it the loop is plain language-model training.

Checkpoints (model, optimizer, LR scheduler, RNG states, step, history, a fingerprint of the
data and of the configuration) are written atomically to `checkpoint_dir/trainer.pt` every
`save_every` steps and when the run is interrupted (Ctrl-C); `resume=True` continues from it
and reproduces the uninterrupted run exactly: the data order is a pure function of (seed,
micro-batch index) and RNG states are restored as they were at the step boundary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from convert.prosparse import ActivationRecorder, LambdaSchedule
from hybrid_runtime.errors import UserError

CHECKPOINT_FILE = "trainer.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    steps: int                      # optimizer steps
    batch_size: int = 8             # sequences per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: float = 2e-5
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 0           # linear warm-up from lr / warmup_steps
    weight_decay: float = 0.0       # AdamW decay on matrices (not norms, not biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # max global grad norm; <= 0: no clipping
    seed: int = 0
    save_every: int = 0             # checkpoint every N steps (0: only on interrupt)
    log_every: int = 10             # history entry / progress-bar refresh every N steps
    bf16: bool | None = None        # bf16 autocast; None: on CUDA only
    grad_checkpointing: bool | None = None  # None: on CUDA only

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0 (got {self.lr})")
        if self.warmup_steps < 0 or self.save_every < 0 or self.weight_decay < 0:
            raise UserError("warmup-steps, save-every and weight-decay must be >= 0")


@dataclass
class LossShaping:
    """What is added to the LM loss: schedule(step) * sum over layers of mean |x1| (see convert.prosparse)."""
    schedule: LambdaSchedule | None = None   # None: no L1 term
    track_sparsity: bool = True              # measure the share of zeros of x1 (bar + history)


@dataclass
class TrainResult:
    steps: int
    tokens: int                     # tokens trained on (all steps, also those before a resume)
    seconds: float                  # wall time of this call
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- models from scratch

@dataclass
class LlamaSpec:
    """A SwiGLU LLaMA built from scratch (for pretraining small models)."""
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    ffn_dim: int = 1408
    vocab_size: int = 8192
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    tie_embeddings: bool = False


def build_llama(spec: LlamaSpec, tokenizer=None, seed: int = 0) -> nn.Module:
    """A freshly initialised LlamaForCausalLM (SiLU / SwiGLU) of the given shape, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if spec.dim % spec.n_heads or spec.n_heads % spec.n_kv_heads:
        raise UserError(f"dim {spec.dim} must divide by n_heads {spec.n_heads}, "
                        f"and n_heads by n_kv_heads {spec.n_kv_heads}")
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(hidden_size=spec.dim, intermediate_size=spec.ffn_dim, num_hidden_layers=spec.n_layers,
                         num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
                         vocab_size=spec.vocab_size, max_position_embeddings=spec.max_seq_len,
                         rms_norm_eps=spec.norm_eps, hidden_act="silu", tie_word_embeddings=spec.tie_embeddings,
                         **ids)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------- helpers



def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): linear warm-up, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class BlockSampler:
    """Micro-batch m holds stream positions [m*B, (m+1)*B) of an endless sequence of epochs,
    each a permutation of the blocks seeded by (seed, epoch): any position is reproducible."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_blocks, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, micro_batch: int) -> torch.Tensor:
        out = []
        for s in range(micro_batch * self.batch_size, (micro_batch + 1) * self.batch_size):
            epoch, pos = divmod(s, self.n)
            out.append(self._permutation(epoch)[pos])
        return torch.stack(out)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def data_fingerprint(blocks: torch.Tensor) -> str:
    """Identifies the training data: shape + hash of the token ids."""
    h = hashlib.sha1(blocks.contiguous().numpy().tobytes()).hexdigest()[:16]
    return f"{tuple(blocks.shape)}:{h}"


def _enable_grad_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}  # non-reentrant: the L1 terms recorded inside layers get gradients
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _save_checkpoint(path: Path, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT_FILE)  # atomic: a crash while saving keeps the previous one


def has_checkpoint(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / CHECKPOINT_FILE).is_file()


def _run_signature(cfg: TrainConfig, shaping: LossShaping | None) -> dict:
    """What must not change between an interrupted run and its resumption."""
    sig = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("save_every", "log_every")}
    sig["schedule"] = shaping.schedule.to_dict() if shaping and shaping.schedule else None
    return sig


# ----------------------------------------------------------------------------- the loop

def train(model: nn.Module, blocks: torch.Tensor, cfg: TrainConfig, shaping: LossShaping | None = None,
          checkpoint_dir: str | Path | None = None, resume: bool = False, device: str | torch.device = "cpu",
          on_step: Callable[[int, dict], None] | None = None, desc: str = "train",
          progress: bool = True) -> TrainResult:
    """Train `model` (an HF causal LM) on `blocks` (N, T) int64 for cfg.steps optimizer steps.

    Loss per micro-batch: LM cross-entropy + schedule(step) * sum over layers of mean |x1|.
    `on_step(step, stats)` is called after each completed step (stats: floats at log steps,
    else tensors). Returns the run's history (one entry per `log_every` steps and the last).
    """
    cfg.validate()
    device = torch.device(device)
    if blocks.dim() != 2 or blocks.dtype != torch.int64:
        raise ValueError(f"blocks must be (N, T) int64, got {tuple(blocks.shape)} {blocks.dtype}")
    if blocks.shape[0] < cfg.batch_size:
        raise UserError(f"the training data has {blocks.shape[0]} blocks of {blocks.shape[1]} tokens, "
                        f"fewer than one batch of {cfg.batch_size} (give more text, or lower "
                        "--batch-size / --block-len)")
    schedule = shaping.schedule if shaping else None
    track = bool(shaping and shaping.track_sparsity) or schedule is not None
    on_cuda = device.type == "cuda"
    bf16 = on_cuda if cfg.bf16 is None else cfg.bf16
    if bf16 and not on_cuda:
        raise UserError("bf16 autocast is for CUDA; on the CPU training runs in fp32")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    model.to(device)
    model.train()
    if (on_cuda if cfg.grad_checkpointing is None else cfg.grad_checkpointing):
        _enable_grad_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  **({"fused": True} if on_cuda else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    sampler = BlockSampler(blocks.shape[0], cfg.batch_size, cfg.seed)
    fingerprint = data_fingerprint(blocks)
    signature = _run_signature(cfg, shaping)

    step, history = 0, []
    if resume:
        if ckpt_dir is None or not has_checkpoint(ckpt_dir):
            raise UserError(f"--resume: no checkpoint in {ckpt_dir} to resume from")
        state = torch.load(ckpt_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{ckpt_dir / CHECKPOINT_FILE}: unknown checkpoint format {state.get('format')}")
        if state["data"] != fingerprint:
            raise UserError(f"--resume: the training data differ from the interrupted run's "
                            f"({fingerprint} vs {state['data']}); use the same files and --block-len")
        for k, v in signature.items():
            if state["signature"].get(k) != v:
                raise UserError(f"--resume: '{k}' differs from the interrupted run "
                                f"({v!r} vs {state['signature'].get(k)!r})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, history = state["step"], state["history"]
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

    def checkpoint(rng: dict) -> None:
        _save_checkpoint(ckpt_dir, {
            "format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
            "history": history, "data": fingerprint, "signature": signature})

    tokens_per_step = cfg.batch_size * cfg.grad_accum * blocks.shape[1]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, dynamic_ncols=True, disable=not progress)
    t0 = time.perf_counter()
    in_update = False
    rng_snapshot, snapshot_step = None, -1
    try:
        while step < cfg.steps:
            rng_snapshot, snapshot_step = _rng_state(), step  # the state an exact resume restarts from
            lam = schedule(step) if schedule is not None else 0.0
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            l1_sum = torch.zeros((), device=device)
            sparsity_sum = torch.zeros((), device=device, dtype=torch.float64)
            for k in range(cfg.grad_accum):
                x = blocks[sampler.indices(step * cfg.grad_accum + k)].to(device, non_blocking=True)  # (B, T)
                # backward inside the recorder: a checkpointing recompute must see the same hooks
                with (ActivationRecorder(model, with_l1=lam > 0) if track else contextlib.nullcontext()) as rec:
                    with autocast():
                        out = model(input_ids=x, labels=x, use_cache=False)
                        loss = out.loss
                        if lam > 0:
                            l1 = rec.l1()
                            loss = loss + lam * l1
                    (loss / cfg.grad_accum).backward()
                if lam > 0:
                    l1_sum += l1.detach()
                if track:
                    sparsity_sum += rec.sparsity_per_layer().mean()
                loss_sum += out.loss.detach()
            in_update = True
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            in_update = False

            stats = {"step": step, "loss": loss_sum / cfg.grad_accum, "l1": l1_sum / cfg.grad_accum,
                     "lambda": lam, "sparsity": sparsity_sum / cfg.grad_accum if track else None,
                     "lr": optimizer.param_groups[0]["lr"]}
            if step % cfg.log_every == 0 or step == cfg.steps:
                stats = {k: (v.item() if torch.is_tensor(v) else v) for k, v in stats.items()}
                history.append(stats)
                bar.set_postfix_str(
                    f"loss {stats['loss']:.3f}"
                    + (f" l1 {stats['l1']:.4f} λ {lam:.3g}" if schedule is not None else "")
                    + (f" sparsity {100 * stats['sparsity']:.1f}%" if track else "")
                    + f" lr {stats['lr']:.2e}")
            bar.update(1)
            if ckpt_dir is not None and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                checkpoint(_rng_state())
            if on_step is not None:
                on_step(step, stats)
    except KeyboardInterrupt:
        bar.close()
        if ckpt_dir is not None:
            if in_update:
                tqdm.write("interrupted inside an optimizer update: keeping the last periodic checkpoint")
            else:
                checkpoint(rng_snapshot if snapshot_step == step else _rng_state())
                tqdm.write(f"interrupted: checkpoint of step {step} saved in {ckpt_dir} (continue with --resume)")
        raise
    bar.close()
    return TrainResult(steps=step, tokens=step * tokens_per_step, seconds=time.perf_counter() - t0,
                       history=history)
