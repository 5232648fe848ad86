"""`hybrid-run`: generate, chat and inspect models. Text to stdout, logs and statistics to stderr."""
from __future__ import annotations

import functools
import json
import sys

import click

from hybrid_runtime.errors import console_main, log
from hybrid_runtime.generate import SamplingParams

PLAIN_CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}Assistant:"




def as_text(raw: bytes | str, what: str) -> str:
    """User text as valid UTF-8: undecodable bytes (from a terminal or a file in another encoding) become
    U+FFFD replacement characters, said once on stderr; generation goes on."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")   # how Python hands over argv bytes it could not decode
    text = raw.decode("utf-8", "replace")
    if "\ufffd" in text and "\ufffd".encode() not in raw:
        log(f"note: {what} is not valid UTF-8; undecodable bytes were replaced by U+FFFD")
    return text


def emit(text: str) -> None:
    """Stream generated text to stdout as it is produced."""
    sys.stdout.write(text)
    sys.stdout.flush()


def model_options(f):
    @click.option("--model", "-m", "model", default=None,
                  help="Model directory, alias (prosparse-7b, prosparse-13b, minicpm-s-1b, relullama-7b) "
                       "or HF repo id org/name (local cache only). Default: the embedded demo model.")
    @click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
    @click.option("--dtype", default="auto", show_default=True,
                  help="Run dtype: auto (the checkpoint's), float32, float16, bfloat16.")
    @click.option("--threads", type=int, default=None, help="CPU threads (default: torch's choice).")
    @click.option("--context", type=int, default=None, help="KV cache length in tokens (default: min(model max, 4096)).")
    @click.option("--predictor", "mode", flag_value="predictor", default=None,
                  help="Hybrid model: compute the neurons the predictors mark active (default; approximate).")
    @click.option("--exact", "mode", flag_value="exact",
                  help="Hybrid model: true activations (gate in full, up/down only where it fires): equals dense.")
    @click.option("--dense", "mode", flag_value="dense", help="No sparsity: the dense engine (the baseline).")
    @click.option("--gpu-memory", default=None,
                  help="GPU budget for a hybrid model, e.g. 8GiB (default: the GPU's free memory).")
    @click.option("--hot-fraction", type=float, default=None,
                  help="Put this fraction of each layer's FFN neurons (the most frequent) on the device, "
                       "overriding the placement solver.")
    @click.option("--cold-format", type=click.Choice(["bf16", "fp16", "int8", "q8_0", "q4_0", "q4_1"]), default=None,
                  help="CPU storage of cold neurons (default: the checkpoint's 16-bit type, or --weights' blocks); "
                       "the q formats are llama.cpp blocks, on --device cpu.")
    @click.option("--weights", default="auto", show_default=True,
                  help="On the CPU: matrices as llama.cpp blocks, q8_0 (int8), q4_1 (int4) or q4_0, read by block "
                       "kernels (less RAM; a hybrid model's attention and lm_head, its cold rows by default); float "
                       "de-quantizes a GGUF file; auto keeps a GGUF file's blocks and a float checkpoint's floats.")
    @click.option("--debug", is_flag=True, hidden=True)
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        kwargs.pop("debug", None)
        return f(*args, **kwargs)
    return wrapper


def sampling_options(f):
    @click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True)
    @click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 means greedy.")
    @click.option("--top-k", type=int, default=0, show_default=True, help="0 disables.")
    @click.option("--top-p", type=float, default=1.0, show_default=True, help="1 disables.")
    @click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
    @click.option("--seed", type=int, default=None)
    @click.option("--stop", multiple=True, help="Stop string (repeatable).")
    @functools.wraps(f)
    def wrapper(*args, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, **kwargs):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=list(stop))
        return f(*args, params=params, **kwargs)
    return wrapper


def _open(model, device, dtype, threads, context, mode, gpu_memory, hot_fraction, cold_format, weights):
    from hybrid_runtime.session import open_model
    return open_model(model, device=device, dtype=dtype, threads=threads, context=context, mode=mode,
                      gpu_memory=gpu_memory, hot_fraction=hot_fraction, cold_format=cold_format, weights=weights)


def _describe(lm) -> None:
    """What runs where, on stderr (after the inputs are known to be good: an error stays one line)."""
    log(lm.dtypes)
    log(f"model: {lm.path} ({lm.config.architecture}, {lm.config.n_layers} layers, act={lm.config.act}) "
        f"on {lm.device} as {str(lm.dtype).replace('torch.', '')}, context {lm.context}, mode {lm.mode}"
        f"{_decode_kind(lm)}")


def _decode_kind(lm) -> str:
    return "" if lm.decode_step is None else f"; {lm.decode_step.describe()}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main_group(debug: bool) -> None:
    """Run activation-sparse LLaMA-family models (hybrid CPU-GPU)."""


@main_group.command()
@model_options
@sampling_options
@click.option("--prompt", "-p", required=True, help="Prompt text; '-' reads it from stdin.")
def generate(params, prompt, **model_kw):
    """Generate a continuation of PROMPT, streaming it to stdout."""
    prompt = as_text(sys.stdin.buffer.read() if prompt == "-" else prompt, "the prompt")
    lm = _open(**model_kw)
    ids = lm.tokenizer(prompt, add_special_tokens=True).input_ids
    gen = lm.generator()
    gen.check_prompt(ids)
    _describe(lm)
    result = gen.generate(ids, params, on_text=emit)
    sys.stdout.write("\n")
    sys.stdout.flush()
    log(result.stats_line())


@main_group.command()
@model_options
@sampling_options
@click.option("--system", default=None, help="System prompt.")
def chat(params, system, **model_kw):
    """Multi-turn chat on stdin/stdout. /reset clears the history, /exit quits; Ctrl-C stops an answer."""
    lm = _open(**model_kw)
    _describe(lm)
    tok = lm.tokenizer
    template = getattr(tok, "chat_template", None)
    if not template:
        log("note: the tokenizer has no chat template; using a plain 'User:/Assistant:' template")
    gen = lm.generator()
    interactive = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if interactive:
        log("chat: type a message; /reset clears the history, /exit quits, Ctrl-C stops an answer")
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            line = sys.stdin.buffer.readline()
        except KeyboardInterrupt:
            break
        if not line:
            break
        msg = as_text(line, "this message").strip()
        if not msg:
            continue
        if msg == "/exit":
            break
        if msg == "/reset":
            history = [{"role": "system", "content": system}] if system else []
            gen.reset()
            log("(history cleared)")
            continue
        history.append({"role": "user", "content": msg})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                      chat_template=template or PLAIN_CHAT_TEMPLATE, return_dict=False)
        if len(ids) >= lm.context:
            history.pop()
            log(f"error: the conversation is {len(ids)} tokens, over the context of {lm.context}; /reset to start over")
            continue

        result = gen.generate(ids, params, on_text=emit)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": result.text})
        log(result.stats_line())


@main_group.command()
@click.option("--model", "-m", "model", default=None,
              help="Model directory, alias or HF repo id (local cache only). Default: the embedded demo model.")
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
@click.option("--debug", is_flag=True, hidden=True)
def info(model, as_json, debug):
    """Architecture, size, dtype, activation, sparsity metadata and available kernels."""
    from hybrid_runtime.info import model_info
    data = model_info(model)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


@main_group.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free port, printed).")
@click.option("--served-model-name", default=None, help="The model id clients send (default: the directory name).")
def serve(host, port, served_model_name, **model_kw):
    """An OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health)."""
    from hybrid_runtime.server import bind
    from hybrid_runtime.server import serve as run_server
    server = bind(host, port)
    lm = _open(**model_kw)
    _describe(lm)
    template = getattr(lm.tokenizer, "chat_template", None)
    if not template:
        log("note: the tokenizer has no chat template; chat requests use a plain 'User:/Assistant:' template")
    run_server(server, lm, served_model_name or lm.path.name, template or PLAIN_CHAT_TEMPLATE)


PLUGIN_GROUP = "hybrid_runtime.commands"


def _register_plugins() -> None:
    """Commands other parts of the project add (`hybrid-run bench` is bench/cli_bench.py), found through the
    package's entry points: the runtime never imports them."""
    from importlib.metadata import entry_points
    for ep in entry_points(group=PLUGIN_GROUP):
        main_group.add_command(ep.load(), ep.name)


_register_plugins()


def main() -> None:
    console_main(main_group)


if __name__ == "__main__":
    main()
