"""Small-scale reproduction of the ProSparse ablation (paper Tables 4, 5, 9), one GPU run.

1. Train a byte-level BPE tokenizer and a SwiGLU LLaMA from scratch on the corpus's train split
   (the last 5% of each file is held out).
2. Continue training that model several ways with the same number of steps (= tokens):
   SwiGLU unchanged (the fair reference: same total training); ReLU only; ReLU + fixed L1
   (one run per --fixed-lambdas value); ProSparse (progressive sine schedule, the 7B preset's
   shape scaled to the steps, one run per --prosparse-lambdas value); ProSparse + FATReLU
   (threshold searched within --max-loss-increase, for each ProSparse run).
3. Evaluate held-out perplexity and activation sparsity (exact zeros of x1 and CETT <= 0.2)
   for each against the SwiGLU original; write ablation.json and ablation.md to --out
   (rewritten after every phase, so a run cut short still leaves its results).

    PYTHONPATH=. python bench/prosparse_ablation.py --corpus CORPUS_DIR --out OUT_DIR

Sizes, steps and lambdas are options; --time-budget-s scales the step counts down (never up)
from a measured step time so the whole run fits.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from convert.data import load_token_blocks, train_bpe_tokenizer  # noqa: E402
from convert.evaluate import evaluate  # noqa: E402
from convert.prosparse import (LambdaSchedule, load_hf_model, load_tokenizer, preset_schedule,  # noqa: E402
                               swap_activation)
from convert.threshold import search_threshold  # noqa: E402
from hybrid_runtime.session import pick_device  # noqa: E402
from convert.train import LlamaSpec, LossShaping, TrainConfig, build_llama, train  # noqa: E402
from hybrid_runtime.errors import UserError, prepare_output_dir  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="Folder of .txt / .jsonl training text.")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--init", default=None,
                   help="Start from this SwiGLU HF model dir (with tokenizer) instead of pretraining one.")
    p.add_argument("--save-models", action="store_true",
                   help="Also save the SwiGLU model and the ProSparse+FATReLU model (HF dirs) under --out.")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    # model
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    # pretraining
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    # conversion
    p.add_argument("--convert-steps", type=int, default=600)
    p.add_argument("--convert-lr", type=float, default=3e-4)
    p.add_argument("--convert-min-lr-ratio", type=float, default=1.0,
                   help="Cosine decay of the conversion LR to this fraction (1: constant after warm-up).")
    p.add_argument("--fixed-lambdas", default="0.3,1,3", help="Comma-separated lambdas for the fixed-L1 runs.")
    p.add_argument("--prosparse-lambdas", default="1,3,10",
                   help="Comma-separated final lambdas of progressive runs (the 7B preset's shape scaled to each).")
    p.add_argument("--max-loss-increase", type=float, default=0.01, help="FATReLU search bound (nats/token).")
    p.add_argument("--search-tokens", type=int, default=65536, help="Held-out tokens for the threshold search.")
    p.add_argument("--eval-tokens", type=int, default=0, help="Held-out tokens for evaluation (0: all).")
    p.add_argument("--time-budget-s", type=float, default=0, help="Scale step counts down to fit (0: off).")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def corpus_files(folder: str) -> list[Path]:
    files = sorted(f for f in Path(folder).iterdir() if f.suffix in (".txt", ".jsonl"))
    if not files:
        raise UserError(f"{folder}: no .txt or .jsonl files")
    return files


def measure_step_seconds(spec: LlamaSpec, tok, blocks: torch.Tensor, args, device: torch.device) -> float:
    """Seconds per training step with the L1 term on (the costlier kind), after a warm-up."""
    model = build_llama(spec, tok, seed=args.seed)
    swap_activation(model, "relu")
    shaping = LossShaping(LambdaSchedule([0.01], [0]))
    times = []

    def on_step(step, stats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    cfg = TrainConfig(steps=8, batch_size=args.batch_size, lr=1e-4, grad_checkpointing=False, log_every=1000)
    train(model, blocks, cfg, shaping, device=device, on_step=on_step, progress=False)
    del model
    return (times[-1] - times[2]) / (len(times) - 3)


def markdown(results: dict) -> str:
    base = results.get("swiglu")
    cont = next((v for v in results["variants"] if v["name"] == "SwiGLU continued"), None)
    lines = ["| model | λ (final) | steps | held-out ppl | Δ ppl vs SwiGLU original | Δ ppl vs SwiGLU continued "
             "| sparsity (zeros of x1) | sparsity (CETT ≤ 0.2) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = ([("SwiGLU original", base)] if base else []) + [(v["name"], v) for v in results["variants"]]

    def delta(e, ref):
        return f"{100 * (e['perplexity'] / ref['eval']['perplexity'] - 1):+.2f}%" if ref else "-"
    for name, r in rows:
        e = r["eval"]
        lam = r.get("final_lambda")
        lam = "-" if lam is None else f"{lam:g}"
        cett = f"{100 * e['cett']['mean']:.2f}%" if "cett" in e else "-"
        lines.append(f"| {name} | {lam} | {r.get('steps', '-')} | {e['perplexity']:.3f} | {delta(e, base)} | "
                     f"{delta(e, cont)} | {100 * e['exact_zero']['mean']:.2f}% | {cett} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    files = corpus_files(args.corpus)
    fixed_lambdas = [float(v) for v in args.fixed_lambdas.split(",") if v.strip()]
    prosparse_lambdas = [float(v) for v in args.prosparse_lambdas.split(",") if v.strip()]
    out = prepare_output_dir(args.out, args.force)
    progress = not args.no_progress
    results: dict = {"args": vars(args), "device": str(device), "files": [f.name for f in files],
                     "timings_s": {}, "variants": []}

    def dump():
        results["timings_s"]["total"] = time.perf_counter() - t_start
        (out / "ablation.json").write_text(json.dumps(results, indent=1))
        (out / "ablation.md").write_text(markdown(results))

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    # --- data
    t = time.perf_counter()
    if args.init:
        tok = load_tokenizer(args.init)
    else:
        tok = train_bpe_tokenizer(files, args.vocab)
    results["timings_s"]["tokenizer"] = time.perf_counter() - t
    t = time.perf_counter()
    train_blocks = load_token_blocks(files, tok, args.block_len, "train")
    heldout = load_token_blocks(files, tok, args.block_len, "heldout", max_tokens=args.eval_tokens or None)
    search_blocks = heldout[: max(1, args.search_tokens // args.block_len)]
    results["timings_s"]["tokenize"] = time.perf_counter() - t
    results["data"] = {"train_tokens": train_blocks.numel(), "heldout_tokens": heldout.numel(),
                       "vocab": len(tok)}
    log(f"tokenizer {len(tok)} tokens; train {train_blocks.numel()} tokens, held-out {heldout.numel()}")

    spec = LlamaSpec(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                     ffn_dim=args.ffn, vocab_size=len(tok), max_seq_len=args.block_len)
    init_model = None
    if args.init:
        init_model = load_hf_model(args.init)
        c = init_model.config
        spec = LlamaSpec(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                         n_kv_heads=c.num_key_value_heads, ffn_dim=c.intermediate_size, vocab_size=c.vocab_size,
                         max_seq_len=c.max_position_embeddings, norm_eps=c.rms_norm_eps,
                         tie_embeddings=bool(c.tie_word_embeddings))
    n_variants = 2 + len(fixed_lambdas) + len(prosparse_lambdas)  # swiglu, relu, L1 runs (FATReLU: no training)
    pre_steps, conv_steps = (0 if args.init else args.pretrain_steps), args.convert_steps
    if args.time_budget_s > 0:
        sec = measure_step_seconds(spec, tok, train_blocks, args, device)
        spent = time.perf_counter() - t_start
        # evaluation + threshold search + saving: ~10% of the training time, plus a fixed margin
        need = 1.1 * sec * (pre_steps + n_variants * conv_steps) + 20
        scale = min(1.0, (args.time_budget_s - spent) / need) if need > 0 else 1.0
        if scale < 1.0:
            pre_steps = max(10, int(pre_steps * scale))
            conv_steps = max(10, int(conv_steps * scale))
            log(f"time budget: {sec * 1000:.1f} ms/step -> steps scaled by {scale:.2f}")
        results["step_seconds"] = sec
    results["steps"] = {"pretrain": pre_steps, "convert": conv_steps,
                        "tokens_per_step": args.batch_size * args.block_len}

    # --- pretrain the SwiGLU original (or take the given one)
    if init_model is not None:
        model = init_model
        results["params"] = sum(p.numel() for p in model.parameters())
        log(f"SwiGLU LLaMA {results['params'] / 1e6:.1f}M parameters from {args.init}")
        history = []
    else:
        model = build_llama(spec, tok, seed=args.seed)
        results["params"] = sum(p.numel() for p in model.parameters())
        log(f"SwiGLU LLaMA {results['params'] / 1e6:.1f}M parameters; pretraining {pre_steps} steps")
        cfg = TrainConfig(steps=pre_steps, batch_size=args.batch_size, lr=args.pretrain_lr,
                          warmup_steps=max(1, pre_steps // 20), weight_decay=0.1, seed=args.seed,
                          grad_checkpointing=False, log_every=50)
        res = train(model, train_blocks, cfg, device=device, desc="pretrain", progress=progress)
        results["timings_s"]["pretrain"] = res.seconds
        history = res.history
    model.to(device)
    ev = evaluate(model, heldout, args.batch_size, sparsity="both")
    results["swiglu"] = {"eval": ev, "steps": pre_steps, "history": history}
    log(f"SwiGLU: ppl {ev['perplexity']:.3f}, CETT sparsity {100 * ev['cett']['mean']:.1f}%")
    dump()
    swiglu_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.save_models:
        model.to("cpu").save_pretrained(out / "swiglu")
        tok.save_pretrained(out / "swiglu")
    del model

    # --- conversions, all from the same weights, same steps and data order
    final_prosparse = preset_schedule("7b", conv_steps).lambdas[-1]
    variants = [("SwiGLU continued", "silu", None), ("ReLU", "relu", None)] \
        + [("ReLU + fixed L1", "relu", LambdaSchedule([lam], [0])) for lam in fixed_lambdas] \
        + [("ProSparse (progressive L1)", "relu", preset_schedule("7b", conv_steps, lam / final_prosparse))
           for lam in prosparse_lambdas]
    prosparse_models = []
    for name, act, schedule in variants:
        model = build_llama(spec, tok, seed=args.seed)
        model.load_state_dict(swiglu_state)
        swap_activation(model, act)
        cfg = TrainConfig(steps=conv_steps, batch_size=args.batch_size, lr=args.convert_lr,
                          min_lr_ratio=args.convert_min_lr_ratio,
                          warmup_steps=max(1, conv_steps // 20), weight_decay=0.1, seed=args.seed + 1,
                          grad_checkpointing=False, log_every=25)
        lam = None if schedule is None else schedule.lambdas[-1]
        log(f"{name}" + (f" (λ -> {lam:g})" if lam is not None else "") + f": {conv_steps} steps")
        res = train(model, train_blocks, cfg, LossShaping(schedule), device=device, desc=name, progress=progress)
        ev = evaluate(model, heldout, args.batch_size, sparsity="both")
        results["variants"].append({"name": name, "activation": act, "final_lambda": lam, "steps": conv_steps,
                                    "schedule": None if schedule is None else schedule.to_dict(),
                                    "train_seconds": res.seconds, "eval": ev, "history": res.history})
        log(f"  ppl {ev['perplexity']:.3f}, sparsity {100 * ev['exact_zero']['mean']:.2f}% "
            f"(CETT {100 * ev['cett']['mean']:.2f}%)")
        dump()
        if name.startswith("ProSparse"):
            prosparse_models.append((lam, model.to("cpu")))
        else:
            del model

    # --- threshold shifting on the ProSparse models
    for lam, model in prosparse_models:
        t = time.perf_counter()
        model.to(device)
        log(f"FATReLU threshold search on ProSparse λ -> {lam:g}")
        search = search_threshold(model, search_blocks, args.max_loss_increase, args.batch_size,
                                  log=lambda m: log(m.strip()))
        ev = evaluate(model, heldout, args.batch_size, sparsity="both")
        results["variants"].append({"name": f"ProSparse + FATReLU (t={search.threshold:.3g})", "activation": "fatrelu",
                                    "final_lambda": lam, "steps": conv_steps, "threshold": search.threshold,
                                    "threshold_search": search.tried, "search_seconds": time.perf_counter() - t,
                                    "eval": ev})
        log(f"  t={search.threshold:.4g}: ppl {ev['perplexity']:.3f}, sparsity {100 * ev['exact_zero']['mean']:.2f}%")
        if args.save_models:
            model.to("cpu").save_pretrained(out / f"prosparse_fatrelu_{lam:g}")
            tok.save_pretrained(out / f"prosparse_fatrelu_{lam:g}")
        model.to("cpu")
        dump()
    dump()
    print(markdown(results))
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
