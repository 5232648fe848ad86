"""`hybrid-run bench`: every system on the same model, prompt and machine, in one run (bench/run_bench.py).

Registered as the `hybrid_runtime.commands` entry point `bench` (setup.py; hybrid_runtime/cli.py loads
it: the runtime never imports the benchmark); also runnable on its own:
`python -m bench.run_bench ...`.
"""
from __future__ import annotations

import click

from bench.options import CPU_DEFAULT, DEFAULT_WORK, GPU_DEFAULT, REPO, SYSTEMS, BenchOptions
from bench.synthetic import SPARSITY_PROFILES


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", default="auto", show_default=True,
              help="synthetic-7b (default with CUDA), synthetic-13b, synthetic-small (default without CUDA), "
                   "synthetic-tiny, or a hybrid model directory / HF checkpoint directory.")
@click.option("--systems", default="auto", show_default=True,
              help=f"Comma list of: {', '.join(SYSTEMS)}; 'auto' = {','.join(GPU_DEFAULT)} with CUDA, "
                   f"{','.join(CPU_DEFAULT)} without; 'all'.")
@click.option("--gpu-memory", default="8GiB", show_default=True,
              help="GPU budget of the budgeted systems (hybrid, dense-offload, hf-offload, llamacpp-offload).")
@click.option("--prompt-tokens", type=int, default=64, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True, help="Timed runs per system (median reported).")
@click.option("--out", default=str(REPO / "bench" / "results"), show_default=True,
              help="Directory for <device>-<date>.json/.md/.png/.log.")
@click.option("--profile-time", is_flag=True,
              help="Also profile the hybrid's decode step (CUDA: the graphed step the runtime runs; host time per "
                   "call, GPU time per segment, cold FFN read rate).")
@click.option("--sweep", default="4,6,8,12,16", show_default=True,
              help="GPU budgets (GiB) for hybrid vs layer offload; 'none' to skip.")
@click.option("--sweep-new-tokens", type=int, default=32, show_default=True)
@click.option("--time-budget-s", type=float, default=540.0, show_default=True,
              help="Time for the whole run, model build included: a system or sweep point that no longer fits "
                   "is skipped, runs are shortened (fewer, then one shorter run), each said in the notes.")
@click.option("--work", default=str(DEFAULT_WORK), show_default=True,
              help="Where the synthetic model and its hybrid directory are built (reused when settings match).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--cold-format", type=click.Choice(["auto", "bf16", "fp16", "int8", "q8_0", "q4_0", "q4_1"]),
              default="auto", show_default=True,
              help="Storage of the hybrid's cold rows on the CPU (auto: the checkpoint's 16-bit type, or --cpu-format's "
                   "blocks on the CPU).")
@click.option("--cpu-format", type=click.Choice(["bf16", "f32", "q8_0", "q4_0", "q4_1"]), default="bf16",
              show_default=True,
              help="Weights of the CPU systems: this engine in bfloat16 or float32, llama.cpp from an F16 or F32 GGUF; "
                   "or llama.cpp blocks (q8_0/q4_0/q4_1): this engine's matrices as blocks (a CPU hybrid's attention, "
                   "lm_head and, unless --cold-format says otherwise, cold rows), llama.cpp from a GGUF of the same blocks.")
@click.option("--profile-tokens-pipeline", "pipe_tokens", type=int, default=None,
              help="Synthetic model: tokens to profile (default per shape).")
@click.option("--predictor-rank", type=int, default=None, help="Synthetic model: predictor rank (default 2 x latent).")
@click.option("--predictor-epochs", type=int, default=None, help="Synthetic model: predictor epochs.")
@click.option("--samples-per-layer", type=int, default=None, help="Synthetic model: predictor samples per layer.")
@click.option("--sparsity-profile", type=click.Choice(list(SPARSITY_PROFILES)), default="prosparse",
              show_default=True,
              help="Synthetic model: prosparse = ProSparse-7B's 89% sparsity; powerinfer = the synthetic 7B behind "
                   "the issue's PowerInfer figures (predictors mark ~24% active, top 32% of neurons serve 61%).")
@click.option("--target-density", type=float, default=None,
              help="Synthetic model: override the profile's mean activation density (e.g. 0.16).")
@click.option("--freq-sigma", type=float, default=None,
              help="Synthetic model: override the profile's log-normal sigma of per-neuron frequencies.")
@click.option("--clean-work", is_flag=True,
              help="Before building, delete the other cached synthetic builds and GGUFs in --work (disk).")
@click.option("--small", is_flag=True, help="Shortcut for --model synthetic-small (a CPU smoke run).")
@click.option("--rebuild", is_flag=True, help="Rebuild the synthetic model even if a matching one exists.")
@click.option("--force", is_flag=True, help="Overwrite today's result files instead of adding a time suffix.")
def bench(model, systems, gpu_memory, prompt_tokens, new_tokens, runs, out, profile_time, sweep, sweep_new_tokens,
          time_budget_s, work, seed, threads, cold_format, cpu_format, pipe_tokens, predictor_rank, predictor_epochs,
          samples_per_layer, sparsity_profile, target_density, freq_sigma, clean_work, small, rebuild, force):
    """Benchmark the hybrid runtime against dense baselines; print a table, write JSON/Markdown/PNG."""
    from bench.run_bench import run_bench
    if small:
        model = "synthetic-small"
    pipeline = {k: v for k, v in (("profile_tokens", pipe_tokens), ("rank", predictor_rank),
                                  ("max_epochs", predictor_epochs), ("samples_per_layer", samples_per_layer))
                if v is not None}
    run_bench(BenchOptions(model=model, systems=systems, gpu_memory=gpu_memory, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, runs=runs, out=out, profile_time=profile_time, sweep=sweep,
                           sweep_new_tokens=sweep_new_tokens, time_budget_s=time_budget_s, work=work, seed=seed,
                           threads=threads, cold_format=cold_format, cpu_format=cpu_format, rebuild=rebuild, force=force,
                           pipeline=pipeline, sparsity_profile=sparsity_profile, target_density=target_density,
                           freq_sigma=freq_sigma, clean_work=clean_work))
