"""`hybrid-run serve`: an OpenAI-compatible HTTP server over one loaded model.

    GET  /health                  {"status": "ok", "model": NAME, "queued": N}
    GET  /v1/models               the one served model
    POST /v1/chat/completions     messages through the model's chat template; `stream: true` as server-sent
                                  events ending with `data: [DONE]`; temperature, top_p, max_tokens
                                  (max_completion_tokens), stop, seed, stream_options.include_usage
    POST /v1/completions          a plain prompt (string, or a list of token ids)

The model decodes one sequence at a time (batch 1): requests wait in a first-come-first-served queue
(`FairSlot`) and each starts from an empty KV cache, so no two ever share or interleave a cache. A
client that disconnects (mid-stream or while waiting) gives its slot up at once: its generation stops at
the next token. Bad requests get HTTP 400 with an OpenAI-style error body and the server goes on.

Why the standard library (`http.server`) and not FastAPI + uvicorn: with batch-1 decoding there is one
request in flight at a time, so an async stack buys nothing, and the whole protocol here (JSON in, JSON or
server-sent events out) is a few hundred lines with no extra dependency to install next to torch.
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hybrid_runtime.errors import UserError, check_number, log
from hybrid_runtime.generate import SamplingParams


class BadRequest(Exception):
    """A request the server refuses: HTTP status, OpenAI error type and parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


class ClientGone(Exception):
    """The client closed the connection: stop generating for it."""


class FairSlot:
    """The model, one request at a time, in arrival order (tickets: a lock is not fair)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    @property
    def queued(self) -> int:
        return self._next_ticket - self._serving

    def acquire(self, gone=lambda: False, poll_s: float = 0.2) -> int:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                if gone():
                    self._abandoned.add(ticket)
                    raise ClientGone
                self._cond.wait(poll_s)
            return ticket

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            while self._serving in self._abandoned:     # skip the tickets of clients who left while queued
                self._abandoned.discard(self._serving)
                self._serving += 1
            self._cond.notify_all()


# ----------------------------------------------------------------------------- requests

def _number(body: dict, key: str, default, low: float | None = None, high: float | None = None,
            low_open: bool = False, integer: bool = False):
    v = body.get(key, default)
    if v is None:
        return default
    if integer and (not isinstance(v, int) or isinstance(v, bool)):
        raise BadRequest(f"'{key}' must be an integer, got {v!r}", key)
    try:
        check_number(f"'{key}'", v, low=low, high=high, low_open=low_open)
    except UserError as e:
        raise BadRequest(str(e), key) from None
    return v


def sampling_from(body: dict, context: int, prompt_len: int) -> SamplingParams:
    """SamplingParams from an OpenAI request body; BadRequest names the field."""
    room = context - prompt_len
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = max(room, 0)
    else:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, low=1, integer=True)
        if max_tokens > room:
            raise BadRequest(f"'max_tokens' is {max_tokens} but the context of {context} tokens leaves "
                             f"{room} after the {prompt_len}-token prompt", "max_tokens")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 4):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("'n' must be 1 (one completion per request)", "n")
    try:
        return SamplingParams(max_new_tokens=max_tokens,
                              temperature=float(_number(body, "temperature", 1.0, low=0, high=2)),
                              top_p=float(_number(body, "top_p", 1.0, low=0, high=1, low_open=True)),
                              seed=_number(body, "seed", None, low=0, integer=True), stop=list(stop))
    except UserError as e:
        raise BadRequest(str(e)) from None


def chat_prompt(tokenizer, body: dict, template: str) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(f"messages[{i}]: needs a 'role' of system, user, assistant or developer", "messages")
        content = m.get("content")
        if isinstance(content, list):   # content parts: the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True, chat_template=template,
                                         return_dict=False)


def completion_prompt(tokenizer, body: dict, vocab: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True).input_ids
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                   for t in prompt):
        return list(prompt)
    raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")


# ----------------------------------------------------------------------------- the server

class ModelServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, lm=None, model_name: str = "", chat_template: str = ""):
        super().__init__(address, Handler)
        self.slot = FairSlot()
        if lm is not None:
            self.attach(lm, model_name, chat_template)

    def attach(self, lm, model_name: str, chat_template: str) -> None:
        """The model to serve (the socket is bound first: a bad address is refused before the model loads)."""
        self.lm, self.model_name, self.chat_template = lm, model_name, chat_template
        self.generator = lm.generator()
        self.created = int(time.time())
        self.clients_left = 0          # generations stopped because their client disconnected


class Handler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:   # one line per request on stderr, not http.server's format
        pass

    # --- plumbing
    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: BadRequest) -> None:
        self._send_json(e.status, {"error": {"message": str(e), "type": e.kind, "param": e.param, "code": None}})

    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("bad Content-Length header") from None
        if n > 16 * 1024 ** 2:
            raise BadRequest("request body over 16 MiB", status=413)
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.server.model_name:
            raise BadRequest(f"model {model!r} is not served here (this server serves {self.server.model_name!r})",
                             "model", kind="invalid_request_error")
        return body

    def _gone(self) -> bool:
        """The client closed its connection (readable with no data = EOF)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            return bool(r) and not self.connection.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    # --- routes
    def do_GET(self) -> None:
        s = self.server
        if self.path.rstrip("/") == "/health":
            self._send_json(200, {"status": "ok", "model": s.model_name, "queued": s.slot.queued})
        elif self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": s.model_name, "object": "model",
                                                             "created": s.created, "owned_by": "hybrid-runtime"}]})
        else:
            self._error(BadRequest(f"no route {self.path}", status=404, kind="not_found_error"))

    def do_POST(self) -> None:
        path = self.path.rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(BadRequest(f"no route {self.path}", status=404, kind="not_found_error"))
            return
        t_arrive = time.perf_counter()
        try:
            body = self._body()
            s = self.server
            tok = s.lm.tokenizer
            chat = path == "/v1/chat/completions"
            ids = chat_prompt(tok, body, s.chat_template) if chat else completion_prompt(tok, body, s.lm.config.vocab_size)
            if len(ids) >= s.lm.context:
                raise BadRequest(f"the prompt is {len(ids)} tokens; the context is {s.lm.context}", "messages"
                                 if chat else "prompt")
            params = sampling_from(body, s.lm.context, len(ids))
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("'stream' must be true or false", "stream")
            opts = body.get("stream_options") or {}
            include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        except BadRequest as e:
            self._error(e)
            return
        try:
            self.server.slot.acquire(self._gone)
        except ClientGone:
            return
        try:
            self._generate(chat, ids, params, stream, include_usage, t_arrive)
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            self.server.clients_left += 1
            log(f"serve: client left; {path} stopped")
        finally:
            self.server.slot.release()

    def _generate(self, chat: bool, ids: list[int], params: SamplingParams, stream: bool, include_usage: bool,
                  t_arrive: float) -> None:
        s = self.server
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        gen = s.generator
        gen.reset()                                  # every request starts from an empty cache
        first = [None]

        def chunk(delta_text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else \
                    ({"content": delta_text} if delta_text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                    "model": s.model_name, "choices": [choice]}

        def send_event(payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def on_text(text: str) -> None:
            if first[0] is None:
                first[0] = time.perf_counter()
            if stream:
                send_event(chunk(text))
            elif self._gone():
                raise ClientGone

        if stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if chat:
                send_event(chunk(None, role=True))
        try:
            result = gen.generate(ids, params, on_text=on_text)
        except BaseException:
            gen.reset()
            raise
        finish = "length" if result.stop_reason in ("length", "context") else "stop"
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(result.tokens),
                 "total_tokens": len(ids) + len(result.tokens)}
        ttft = (first[0] or time.perf_counter()) - t_arrive
        log(f"serve: {obj} {len(ids)}+{len(result.tokens)} tokens, first text after {ttft:.3f} s, "
            f"{result.decode_tps:.1f} tok/s, {finish}")
        if stream:
            send_event(chunk(None, finish))
            if include_usage:
                send_event({"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                            "model": s.model_name, "choices": [], "usage": usage})
            send_event("[DONE]")
            return
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        self._send_json(200, {"id": rid, "object": obj, "created": created, "model": s.model_name,
                              "choices": [choice], "usage": usage})


def bind(host: str, port: int) -> ModelServer:
    """The listening server, without a model yet; UserError when the address cannot be used."""
    try:
        return ModelServer((host, port))
    except (OSError, OverflowError) as e:
        raise UserError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None


def serve(server: ModelServer, lm, model_name: str, chat_template: str, ready=None) -> None:
    """Serve until Ctrl-C / SIGTERM (both arrive as KeyboardInterrupt in the main thread)."""
    server.attach(lm, model_name, chat_template)
    log(f"serve: {model_name!r} on http://{server.server_address[0]}:{server.server_address[1]}/v1 "
        "(OpenAI API; Ctrl-C stops)")
    if ready is not None:
        ready(server)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        log("serve: stopping")
    finally:
        server.server_close()
