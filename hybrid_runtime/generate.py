"""Token generation: sampling, streaming detokenization, stop conditions, timing.

The decode loop keeps one deliberate host sync per token (reading the sampled id, needed to
stream text and to stop at EOS); it is marked where it happens.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybrid_runtime.errors import UserError, check_number


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0      # 0: greedy
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        check_number("--temperature", self.temperature, low=0)
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        check_number("--top-p", self.top_p, low=0, high=1, low_open=True)
        check_number("--repetition-penalty", self.repetition_penalty, low=0, low_open=True)
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise UserError(f"--seed must be in [0, 2^63), got {self.seed}")
        if any(s == "" for s in self.stop):
            raise UserError("--stop: an empty stop string would stop at once")


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    stop_reason: str            # "eos", "stop", "length", "context", "interrupted"
    prompt_tokens: int          # tokens actually prefilled (a reused cache prefix is not counted)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int           # forward passes in the decode loop (the first token comes from prefill)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def stats_line(self) -> str:
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_seconds:.3f} s "
                f"({self.prefill_tps:.1f} tok/s); decode: {self.decode_steps} steps in "
                f"{self.decode_seconds:.3f} s ({self.decode_tps:.1f} tok/s); stop: {self.stop_reason}")


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
                seen: torch.Tensor | None) -> torch.Tensor:
    """logits (V,) fp32 -> next token id as a 0-dim device tensor (no host sync)."""
    if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
        prev = logits[seen]
        logits = logits.scatter(0, seen, torch.where(prev > 0, prev / p.repetition_penalty,
                                                     prev * p.repetition_penalty))
    if p.temperature == 0.0:
        return logits.argmax()
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > p.top_p   # keep the smallest set reaching top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


class TextStream:
    """Incremental detokenizer: emits only complete characters, holds back possible stop prefixes."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""          # decoded text so far (complete characters only)
        self.emitted = 0        # characters already handed to the caller
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the new text that is safe to show."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        self.text = text
        for s in self.stop:
            i = self.text.find(s, max(0, self.emitted - len(s)))
            if i >= 0:
                self.text, self.stopped = self.text[:i], True
        safe = len(self.text) if self.stopped else len(self.text) - self._held_back()
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


class Generator:
    """Runs a model (dense or hybrid: anything with `forward(tokens, input_pos)`) for one sequence,
    keeping its KV cache across calls so chat turns only prefill what is new."""

    def __init__(self, model: torch.nn.Module, tokenizer, context: int, device: torch.device | str,
                 eos_ids: list[int] | None = None, prefill_chunk: int = 512,
                 decode_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.model, self.tokenizer, self.context = model, tokenizer, context
        # one-token forward `(tokens, input_pos, kv_len) -> logits`: a CUDA-graph step on CUDA, the one-call
        # CpuDecodeStep on the CPU, else the model itself (told how much of the cache is filled, kv_len, so
        # attention reads only that)
        self.decode_step = decode_step or model
        self.device = torch.device(device)
        self.prefill_chunk = prefill_chunk
        eos = set(eos_ids or [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        self.positions = torch.arange(context, device=self.device)
        self.cached: list[int] = []   # tokens whose K/V are in the cache, in order

    def reset(self) -> None:
        self.cached = []

    @torch.inference_mode()
    def _forward(self, ids: list[int], start: int) -> torch.Tensor:
        """Feed ids at positions start.. in chunks; return logits of the last position (V,)."""
        logits = None
        for i in range(0, len(ids), self.prefill_chunk):
            chunk = ids[i:i + self.prefill_chunk]
            tokens = torch.tensor([chunk], device=self.device)
            logits = self.model(tokens, self.positions[start + i:start + i + len(chunk)],
                                kv_len=start + i + len(chunk))
        return logits[0, -1]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # deliberate: timing boundary

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """UserError for a prompt that cannot be generated from (empty, or not shorter than the context)."""
        if not prompt_ids:
            raise UserError("the prompt is empty (no tokens)")
        if len(prompt_ids) >= self.context:
            raise UserError(f"the prompt is {len(prompt_ids)} tokens but the context is {self.context} "
                            "tokens (raise --context, up to the model's max_position_embeddings)")

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        self.check_prompt(prompt_ids)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        # reuse the cached prefix (chat turns); always recompute at least the last prompt token
        keep = 0
        while keep < min(len(self.cached), len(prompt_ids) - 1) and self.cached[keep] == prompt_ids[keep]:
            keep += 1
        new_prompt = prompt_ids[keep:]
        stream = TextStream(self.tokenizer, params.stop)
        out: list[int] = []
        seen = torch.tensor(prompt_ids, device=self.device) if params.repetition_penalty != 1.0 else None
        self._sync()
        t0 = time.perf_counter()
        self.cached = prompt_ids[:keep]
        logits = self._forward(new_prompt, keep)
        self.cached = list(prompt_ids)
        self._sync()
        t1 = time.perf_counter()
        reason, steps = "length", 0
        try:
            while len(out) < params.max_new_tokens:
                nxt = sample_next(logits, params, gen, seen)
                token = int(nxt.item())  # deliberate sync: the id is needed to stream and to stop
                if token in self.eos_ids:
                    reason = "eos"
                    break
                out.append(token)
                text = stream.push(token)
                if text and on_text:
                    on_text(text)
                if stream.stopped:
                    reason = "stop"
                    break
                if len(self.cached) >= self.context:
                    reason = "context"
                    break
                if len(out) == params.max_new_tokens:
                    break
                if seen is not None:
                    seen = torch.cat([seen, nxt.view(1)])
                pos = len(self.cached)
                logits = self.decode_step(nxt.view(1, 1), self.positions[pos:pos + 1], kv_len=pos + 1)[0, -1]
                self.cached.append(token)
                steps += 1
        except KeyboardInterrupt:
            reason = "interrupted"
        self._sync()
        t2 = time.perf_counter()
        rest = stream.flush() if not stream.stopped else ""
        if rest and on_text:
            on_text(rest)
        return GenerationResult(tokens=out, text=stream.text, stop_reason=reason,
                                prompt_tokens=len(new_prompt), prefill_seconds=t1 - t0,
                                decode_seconds=t2 - t1, decode_steps=steps)
