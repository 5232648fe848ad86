"""`hybrid-convert prosparse` and `hybrid-convert eval`."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click
import torch

from convert.data import load_token_blocks
from convert.evaluate import SPARSITY_METHODS, evaluate
from convert.prosparse import (PRESETS, TOKENIZER_FILES, LambdaSchedule, load_hf_model,
                               load_tokenizer, model_activation, preset_schedule, read_hf_config,
                               swap_activation)
from convert.threshold import apply_threshold, search_threshold
from hybrid_runtime.session import pick_device
from convert.train import LossShaping, TrainConfig, has_checkpoint, train
from hybrid_runtime.errors import OUTPUT_MARKER, UserError, check_number, check_output_path, prepare_output_dir

RUN_ARGS = "run_args.json"          # the run's arguments, for --resume
BASELINE_EVAL = "baseline_eval.json"  # the source model's evaluation, kept across a resume
CHECKPOINT_DIR = "checkpoint"
REPORT = "prosparse_report.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Options that may change when resuming (everything else must match the interrupted run).
RESUME_FREE = ("resume", "force", "out", "device", "save_every")


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _parse_list(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated {kind.__name__} values, got '{text}'") from None


def resolve_schedule(schedule: str, lambdas: str | None, boundaries: str | None, steps: int | None,
                     lambda_scale: float) -> tuple[LambdaSchedule, int]:
    """The lambda schedule and step count from the CLI's options."""
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1 (got {steps})")
    if not lambda_scale >= 0:
        raise UserError(f"--lambda-scale must be >= 0 (got {lambda_scale})")
    if lambdas is not None or boundaries is not None:
        if lambdas is None or boundaries is None:
            raise UserError("--lambdas and --boundaries go together (one target per stage, one boundary per stage)")
        lam = _parse_list(lambdas, float, "--lambdas")
        bnd = _parse_list(boundaries, int, "--boundaries")
        if len(lam) != len(bnd):
            raise UserError(f"--lambdas has {len(lam)} values but --boundaries has {len(bnd)}")
        s = LambdaSchedule([v * lambda_scale for v in lam], bnd)
    elif schedule in PRESETS:
        s = preset_schedule(schedule, steps, lambda_scale)
    elif Path(schedule).is_file():
        s = LambdaSchedule.from_json(schedule)
        s = LambdaSchedule([v * lambda_scale for v in s.lambdas], s.boundaries)
    else:
        raise UserError(f"--schedule: '{schedule}' is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    steps = s.total_steps if steps is None else steps
    if steps < s.total_steps:
        raise UserError(f"--steps {steps} ends before the schedule's last boundary {s.total_steps} "
                        "(presets are scaled to --steps; explicit schedules are not)")
    if steps < 1:
        raise UserError("the schedule ends at step 0: give --steps")
    return s, steps


def _check_out_free(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        hint = " or --resume to continue an interrupted run" if (out / RUN_ARGS).is_file() else ""
        raise UserError(f"{out}: output directory exists and is not empty (use --force to overwrite{hint})")
    if force and out.is_dir() and any(out.iterdir()) and not (out / OUTPUT_MARKER).is_file():
        raise UserError(f"{out}: not empty and not written by this product (no {OUTPUT_MARKER}); --force only "
                        "replaces this product's own output directories: choose another output")


def _jsonable(v):
    return json.loads(json.dumps(list(v) if isinstance(v, tuple) else v))


def _fmt_eval(e: dict) -> str:
    method = "exact zeros of x1" if e["sparsity_method"] == "exact-zero" else f"CETT <= {e['cett']['bound']}"
    return f"perplexity {e['perplexity']:.3f} (loss {e['loss']:.4f}), sparsity {100 * e['sparsity']:.2f}% ({method})"


# ----------------------------------------------------------------------------- prosparse

@click.command("prosparse")
@click.option("--model", "model_dir", type=click.Path(), help="Source HF checkpoint directory (LLaMA family).")
@click.option("--data", multiple=True, type=click.Path(),
              help="Training text: .txt or .jsonl with a 'text' field (repeatable).")
@click.option("--out", type=click.Path(), required=True,
              help="Output directory (HF checkpoint + prosparse_report.json).")
@click.option("--activation", type=click.Choice(["relu", "drelu", "relu2"]), default="relu", show_default=True,
              help="Activation substituted for SiLU: relu (ProSparse), drelu (ReLU on gate and up), relu2.")
@click.option("--schedule", default="7b", show_default=True,
              help=f"Lambda schedule: a preset ({', '.join(PRESETS)}), scaled to --steps, or a JSON file "
                   "{\"lambdas\": [...], \"boundaries\": [...]}.")
@click.option("--lambdas", default=None,
              help="Stage targets, comma-separated (with --boundaries; instead of --schedule).")
@click.option("--boundaries", default=None, help="Cumulative last step of each stage, comma-separated.")
@click.option("--lambda-scale", type=float, default=1.0, show_default=True, help="Multiply every lambda by this.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: the schedule's last boundary).")
@click.option("--threshold", type=float, default=None, help="FATReLU threshold applied after training (relu only).")
@click.option("--search-threshold", is_flag=True,
              help="Search the largest FATReLU threshold within --max-loss-increase.")
@click.option("--max-loss-increase", type=float, default=0.01, show_default=True,
              help="Threshold search bound: held-out loss increase over ReLU, nats/token (0.01 ~ +1% perplexity).")
@click.option("--block-len", type=int, default=1024, show_default=True, help="Tokens per training sequence.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=2e-5, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--warmup-steps", type=int, default=None, help="LR warm-up steps (default: 1% of --steps).")
@click.option("--min-lr-ratio", type=float, default=1.0, show_default=True,
              help="Cosine-decay the LR to this fraction of --lr by the last step (1: constant after warm-up).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--save-every", type=int, default=500, show_default=True,
              help="Checkpoint every N steps (0: only on Ctrl-C).")
@click.option("--eval-tokens", type=int, default=131072, show_default=True,
              help="Held-out tokens for the before/after evaluation and the threshold search.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
              help="Weights during training (bfloat16: pure-bf16 AdamW, half the memory, less precise).")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=None,
              help="Recompute layer activations in backward (default: on with CUDA).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out exactly where it stopped.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
@click.pass_context
def prosparse_cmd(ctx: click.Context, **kw) -> None:
    """Make a LLaMA-family checkpoint activation-sparse with ProSparse (ReLU, progressive L1, FATReLU)."""
    out = Path(kw["out"])
    if kw["resume"]:
        if kw["force"]:
            raise UserError("--resume and --force contradict each other")
        if not (out / RUN_ARGS).is_file() or not has_checkpoint(out / CHECKPOINT_DIR):
            raise UserError(f"{out}: no interrupted run to resume (no {RUN_ARGS} and {CHECKPOINT_DIR}/)")
        stored = json.loads((out / RUN_ARGS).read_text())
        for name, value in kw.items():
            if name in RESUME_FREE or ctx.get_parameter_source(name) != click.core.ParameterSource.COMMANDLINE:
                continue
            if _jsonable(value) != stored.get(name):
                raise UserError(f"--resume: --{name.replace('_', '-')} differs from the interrupted run "
                                f"({value!r} vs {stored.get(name)!r}); resume with the same options")
        kw = {**stored, "out": str(out), "resume": True, "force": False,
              "device": kw["device"], "save_every": kw["save_every"]}
    run_prosparse(kw)


def run_prosparse(kw: dict) -> dict:
    """The `prosparse` command's work, from its options; returns the report."""
    t_start = time.perf_counter()
    out, resume = Path(kw["out"]), kw["resume"]
    # --- validate everything before touching --out
    if not kw["model_dir"]:
        raise UserError("--model is required")
    if not kw["data"]:
        raise UserError("--data is required (one or more .txt / .jsonl files)")
    for f in kw["data"]:
        if not Path(f).is_file():
            raise UserError(f"{f}: data file not found")
    inputs = [("--model", kw["model_dir"]), *(("--data", f) for f in kw["data"])]
    if kw["schedule"] and Path(kw["schedule"]).is_file():
        inputs.append(("--schedule", kw["schedule"]))
    check_output_path(out, inputs)
    for name in ("lambda_scale", "lr", "weight_decay", "min_lr_ratio", "max_loss_increase", "threshold"):
        check_number("--" + name.replace("_", "-"), kw[name])
    for name in ("block_len", "batch_size", "grad_accum", "eval_tokens"):
        if kw[name] <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {kw[name]}")
    if kw["save_every"] < 0:
        raise UserError(f"--save-every must be >= 0, got {kw['save_every']}")
    if not kw["lambda_scale"] >= 0:
        raise UserError(f"--lambda-scale must be >= 0, got {kw['lambda_scale']}")
    schedule, steps = resolve_schedule(kw["schedule"], kw["lambdas"], kw["boundaries"], kw["steps"],
                                       kw["lambda_scale"])
    if kw["threshold"] is not None:
        if kw["search_threshold"]:
            raise UserError("--threshold and --search-threshold exclude each other")
        if not kw["threshold"] > 0:
            raise UserError(f"--threshold must be > 0 (got {kw['threshold']})")
    if kw["search_threshold"] and not kw["max_loss_increase"] > 0:
        raise UserError(f"--max-loss-increase must be > 0 (got {kw['max_loss_increase']})")
    if (kw["threshold"] is not None or kw["search_threshold"]) and kw["activation"] != "relu":
        raise UserError(f"FATReLU thresholds apply to --activation relu (got {kw['activation']})")
    if kw["eval_tokens"] < kw["block_len"]:
        raise UserError(f"--eval-tokens {kw['eval_tokens']} is less than one block of {kw['block_len']}")
    warmup = kw["warmup_steps"] if kw["warmup_steps"] is not None else max(steps // 100, 0)
    if not 0 <= kw["min_lr_ratio"] <= 1:
        raise UserError(f"--min-lr-ratio must be in [0, 1] (got {kw['min_lr_ratio']})")
    cfg = TrainConfig(steps=steps, batch_size=kw["batch_size"], grad_accum=kw["grad_accum"], lr=kw["lr"],
                      min_lr_ratio=kw["min_lr_ratio"], warmup_steps=warmup, weight_decay=kw["weight_decay"],
                      seed=kw["seed"], save_every=kw["save_every"], grad_checkpointing=kw["grad_checkpointing"])
    cfg.validate()
    raw = read_hf_config(kw["model_dir"])
    max_pos = raw.get("max_position_embeddings")
    if max_pos is not None and kw["block_len"] > max_pos:
        raise UserError(f"--block-len {kw['block_len']} exceeds the model's max_position_embeddings {max_pos}")
    device = pick_device(kw["device"])
    if not resume:
        _check_out_free(out, kw["force"])

    tokenizer = load_tokenizer(kw["model_dir"])
    _log(f"tokenizing {len(kw['data'])} file(s)...")
    train_blocks = load_token_blocks(kw["data"], tokenizer, kw["block_len"], "train")
    heldout = load_token_blocks(kw["data"], tokenizer, kw["block_len"], "heldout", max_tokens=kw["eval_tokens"])
    if train_blocks.shape[0] < cfg.batch_size:
        raise UserError(f"the training split has {train_blocks.shape[0]} blocks of {kw['block_len']} tokens, "
                        f"fewer than one batch of {cfg.batch_size} "
                        "(give more text, or lower --batch-size / --block-len)")
    _log(f"train: {train_blocks.numel()} tokens ({train_blocks.shape[0]} blocks), held-out: {heldout.numel()} tokens; "
         f"{steps} steps x {cfg.batch_size * cfg.grad_accum * kw['block_len']} tokens")

    if not resume:
        prepare_output_dir(out, kw["force"], inputs)
        (out / RUN_ARGS).write_text(json.dumps({k: _jsonable(v) for k, v in kw.items()}, indent=1))

    model = load_hf_model(kw["model_dir"], dtype=DTYPES[kw["dtype"]], device=device)
    source_act, source_threshold = model_activation(model)
    if (out / BASELINE_EVAL).is_file():
        before = json.loads((out / BASELINE_EVAL).read_text())
    else:
        _log(f"evaluating the source model ({source_act})...")
        before = evaluate(model, heldout, kw["batch_size"])
        (out / BASELINE_EVAL).write_text(json.dumps(before))
    _log(f"source:  {_fmt_eval(before)}")

    act = kw["activation"]
    if source_act == act or (act == "relu" and source_act == "fatrelu"):
        _log(f"the model already computes {source_act}"
             + (f" (threshold {source_threshold})" if source_act == "fatrelu" else "")
             + ": skipping the activation swap")
    else:
        swap_activation(model, act)
        _log(f"activation: {source_act} -> {act} in {model.config.num_hidden_layers} layers")
    _log(f"lambda schedule: {schedule.lambdas} at steps {schedule.boundaries}")

    result = train(model, train_blocks, cfg, LossShaping(schedule), checkpoint_dir=out / CHECKPOINT_DIR,
                   resume=resume, device=device, desc="prosparse")
    trained = evaluate(model, heldout, kw["batch_size"])
    _log(f"trained: {_fmt_eval(trained)}")

    search = None
    if kw["search_threshold"]:
        _log(f"searching the FATReLU threshold (held-out loss increase <= {kw['max_loss_increase']})...")
        search = search_threshold(model, heldout, kw["max_loss_increase"], kw["batch_size"], log=_log)
        if search.threshold == 0:
            _log("no threshold keeps the loss within the bound: keeping plain ReLU")
    elif kw["threshold"] is not None:
        apply_threshold(model, kw["threshold"])
    final_act, final_threshold = model_activation(model)
    final = trained
    if (final_act, final_threshold) != (trained["activation"], trained["threshold"]):
        final = evaluate(model, heldout, kw["batch_size"])
        _log(f"final ({final_act}, t={final_threshold:.4g}): {_fmt_eval(final)}")

    save_dtype = DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), torch.float32)
    model.to(device="cpu", dtype=save_dtype)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(kw["model_dir"]) / name).is_file():
            shutil.copy2(Path(kw["model_dir"]) / name, out / name)
    report = {
        "source": {"model": str(kw["model_dir"]), "model_type": raw["model_type"], "activation": source_act,
                   "threshold": source_threshold},
        "activation": final_act, "threshold": final_threshold,
        "options": {k: _jsonable(v) for k, v in kw.items()},
        "schedule": schedule.to_dict(),
        "data": {"files": list(kw["data"]), "train_tokens": train_blocks.numel(), "heldout_tokens": heldout.numel(),
                 "block_len": kw["block_len"], "heldout_split": "last 5% of each file"},
        "train": {"steps": result.steps, "tokens": result.tokens, "seconds_this_run": result.seconds,
                  "history": result.history},
        "threshold_search": None if search is None else {
            "threshold": search.threshold, "base_loss": search.base_loss, "loss": search.loss,
            "max_loss_increase": search.max_loss_increase, "tried": search.tried},
        "eval": {"source": before, "trained": trained, "final": final},
        "seconds_this_run": time.perf_counter() - t_start,
    }
    (out / REPORT).write_text(json.dumps(report, indent=1))
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    for name in (RUN_ARGS, BASELINE_EVAL):
        (out / name).unlink(missing_ok=True)
    _log(f"wrote {out} ({final_act}" + (f", threshold {final_threshold:.4g}" if final_act == "fatrelu" else "")
         + f"; sparsity {100 * before['sparsity']:.1f}% -> {100 * final['sparsity']:.1f}%, "
         f"perplexity {before['perplexity']:.3f} -> {final['perplexity']:.3f})")
    return report


# ----------------------------------------------------------------------------- eval

@click.command("eval")
@click.option("--model", "model_dir", type=click.Path(), required=True, help="HF checkpoint directory (LLaMA family).")
@click.option("--data", multiple=True, type=click.Path(), required=True, help="Text: .txt or .jsonl (repeatable).")
@click.option("--split", type=click.Choice(["heldout", "train", "all"]), default="heldout", show_default=True,
              help="Which part of each file (held-out: its last 5%).")
@click.option("--tokens", type=int, default=262144, show_default=True, help="At most this many tokens.")
@click.option("--block-len", type=int, default=1024, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--sparsity", "method", type=click.Choice(SPARSITY_METHODS), default="auto", show_default=True,
              help="exact: zeros of x1; cett: output-magnitude threshold (ReLU^2 paper); auto: exact for ReLU models.")
@click.option("--cett-bound", type=float, default=0.2, show_default=True, help="CETT bound for --sparsity cett.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Default: bfloat16 on CUDA, float32 on CPU.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(), default=None, help="Also write the results to this JSON file.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["dense", "exact", "predictor"]),
              help="Evaluate the runtime's modes through this engine (repeatable; default for a hybrid model "
                   "directory: every mode it has): perplexity, FFN sparsity, predictor recall and density, "
                   "greedy agreement with dense, on the same text.")
@click.option("--force", is_flag=True, help="Overwrite --json.")
def eval_cmd(model_dir, data, split, tokens, block_len, batch_size, method, cett_bound, dtype, device,
             json_out, modes, force) -> None:
    """Held-out perplexity and activation sparsity (overall and per layer) of a LLaMA-family checkpoint,
    or of the runtime's dense / exact / predictor modes (--mode; a hybrid model directory)."""
    if json_out:
        check_output_path(json_out, [("--model", model_dir), *(("--data", f) for f in data)], what="--json",
                          kind="file")
    if json_out and Path(json_out).exists() and not force:
        raise UserError(f"{json_out}: exists (use --force to overwrite)")
    check_number("--cett-bound", cett_bound, low=0, high=1, low_open=True, high_open=True)
    for name, v in (("--batch-size", batch_size), ("--block-len", block_len), ("--tokens", tokens)):
        if v < 1:
            raise UserError(f"{name} must be >= 1 (got {v})")
    for f in data:
        if not Path(f).is_file():
            raise UserError(f"{f}: data file not found")
    raw = read_hf_config(model_dir)
    max_pos = raw.get("max_position_embeddings")
    if max_pos is not None and block_len > max_pos:
        raise UserError(f"--block-len {block_len} exceeds the model's max_position_embeddings {max_pos}")
    from hybrid_runtime.model_dir import open_model_dir
    md = open_model_dir(model_dir)
    if modes or md.is_hybrid:
        from convert.evaluate import evaluate_modes, format_modes_table
        if not modes:
            modes = ("exact", "predictor") if md.hybrid.predictors_file else ("exact",)
        if device not in ("auto", "cpu") or dtype not in (None, "float32"):
            raise UserError("--mode evaluates on the CPU in float32 (the reference arithmetic); drop --device/--dtype")
        blocks = load_token_blocks(data, load_tokenizer(model_dir), block_len, split, max_tokens=tokens)
        res = evaluate_modes(md, blocks, modes, batch_size, progress=True)
        res = {"data": list(data), "split": split, "block_len": block_len, **res}
        click.echo(f"{model_dir}: {res['activation']}, {res['tokens']} {split} tokens")
        click.echo(format_modes_table(res))
        if json_out:
            Path(json_out).write_text(json.dumps(res, indent=1))
        return
    dev = pick_device(device)
    dt = DTYPES[dtype] if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tokenizer = load_tokenizer(model_dir)
    blocks = load_token_blocks(data, tokenizer, block_len, split, max_tokens=tokens)
    model = load_hf_model(model_dir, dtype=dt, device=dev)
    res = evaluate(model, blocks, batch_size, sparsity=method, cett_bound=cett_bound, progress=True)
    res = {"model": str(model_dir), "data": list(data), "split": split, "block_len": block_len, **res}
    act = res["activation"] + (f"(t={res['threshold']:.4g})" if res["activation"] == "fatrelu" else "")
    click.echo(f"{model_dir}: {act}, {res['tokens']} {split} tokens")
    click.echo(_fmt_eval(res))
    click.echo("per layer: " + " ".join(f"{100 * s:.1f}" for s in res["sparsity_per_layer"]))
    if "cett" in res and res["sparsity_method"] != "cett":
        click.echo(f"CETT <= {cett_bound}: {100 * res['cett']['mean']:.2f}%")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(res, indent=1))
