"""The HTTP API behind ``llmlab serve`` (standard library http.server, no extra dependency).

Endpoints:

- ``GET /v1/models``: the one model served, OpenAI-style.
- ``GET /health``: ``{"status": "ok"}``.
- ``POST /v1/chat/completions``: OpenAI-compatible chat completions (``messages``, ``max_tokens`` or
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``repetition_penalty``,
  ``stream``, ``stream_options.include_usage``); ``n`` must be 1 and ``stop`` is not supported.
  ``stream: true`` answers server-sent events of ``chat.completion.chunk`` objects ending in
  ``data: [DONE]``.
- ``POST /generate``: ``{"prompt": str | messages, ...same sampling keys..., "stream": bool}`` →
  ``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}``; a string prompt goes through
  the chat template for chat models unless ``"raw": true``. Streaming sends ``{"text": piece}`` events
  and a final event with ``"done": true``.

One request generates at a time (a lock); others wait. Bodies over 1 MiB are refused.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llmlab.inference.generation import GenerationSettings, encode_prompt, generate_ids

MAX_BODY = 1 << 20


class RequestError(Exception):
    """A bad request: answered with this status and message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _settings(body: dict, defaults: GenerationSettings) -> GenerationSettings:
    def num(key: str, typ: type):
        v = body.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(f"'{key}' must be a number")
        return typ(v)

    max_new = num("max_completion_tokens", int) or num("max_tokens", int) or num("max_new_tokens", int)
    if max_new is not None and max_new < 1:
        raise RequestError("max_tokens must be at least 1")
    s = defaults.replace(max_new_tokens=max_new, temperature=num("temperature", float), top_p=num("top_p", float),
                         top_k=num("top_k", int), repetition_penalty=num("repetition_penalty", float),
                         seed=num("seed", int))
    return s


def _messages(x: Any) -> list[dict]:
    if not isinstance(x, list) or not x:
        raise RequestError("'messages' must be a non-empty list of {role, content}")
    out = []
    for m in x:
        if not isinstance(m, dict) or "role" not in m:
            raise RequestError("each message needs a 'role' and a 'content'")
        c = m.get("content")
        if isinstance(c, list):  # OpenAI content parts: keep the text ones
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(c, str):
            raise RequestError("message 'content' must be a string")
        out.append({"role": str(m["role"]), "content": c})
    return out


class InferenceServer(ThreadingHTTPServer):
    """An HTTP server holding one loaded model. ``serve_forever()`` runs it; ``shutdown()`` stops it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, model: Any, tokenizer: Any, is_chat: bool, host: str = "127.0.0.1", port: int = 8000,
                 model_id: str = "llmlab", defaults: GenerationSettings | None = None, system: str | None = None,
                 verbose: bool = False):
        self.model, self.tokenizer, self.is_chat = model, tokenizer, is_chat
        self.model_id = model_id
        self.defaults = defaults or GenerationSettings()
        self.system = system
        self.verbose = verbose
        self.lock = threading.Lock()
        self.created = int(time.time())
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        """The base URL the server listens on."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: InferenceServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # -- plumbing ----------------------------------------------------------------------------------
    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": {"message": message, "type": "invalid_request_error" if status < 500
                                      else "server_error", "code": status}})

    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError("bad Content-Length") from None
        if n > MAX_BODY:
            raise RequestError("request body too large", 413)
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise RequestError("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, obj: Any) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj)
        self._chunk(f"data: {payload}\n\n".encode())

    def _end_events(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- routes ------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model_id, "object": "model",
                                                         "created": self.server.created, "owned_by": "llmlab"}]})
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._error(404, f"no route GET {path}")

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        try:
            body = self._body()
            if path == "/v1/chat/completions":
                self._chat_completions(body)
            elif path == "/generate":
                self._generate(body)
            else:
                self._error(404, f"no route POST {path}")
        except RequestError as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _generate(self, body: dict) -> None:
        srv = self.server
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = _messages(prompt)
        elif not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string or a list of messages")
        settings = _settings(body, srv.defaults)
        chat = srv.is_chat and not body.get("raw", False)
        ids = encode_prompt(srv.tokenizer, prompt, chat, system=srv.system if chat else None)
        if body.get("stream"):
            self._start_events()
            with srv.lock:
                r = generate_ids(srv.model, srv.tokenizer, ids, settings, chat,
                                 on_text=lambda t: self._event({"text": t}))
            self._event({"done": True, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                         "completion_tokens": r.completion_tokens})
            self._end_events()
            return
        with srv.lock:
            r = generate_ids(srv.model, srv.tokenizer, ids, settings, chat)
        self._json(200, {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                         "completion_tokens": r.completion_tokens, "model": srv.model_id})

    def _chat_completions(self, body: dict) -> None:
        srv = self.server
        msgs = _messages(body.get("messages"))
        if body.get("n", 1) != 1:
            raise RequestError("only n = 1 is supported")
        if body.get("stop") not in (None, [], ""):
            raise RequestError("'stop' is not supported")
        settings = _settings(body, srv.defaults)
        ids = encode_prompt(srv.tokenizer, msgs, srv.is_chat, system=srv.system)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        base = {"id": cid, "created": created, "model": srv.model_id}

        def usage(r):
            return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                    "total_tokens": r.prompt_tokens + r.completion_tokens}

        if body.get("stream"):
            chunk = {**base, "object": "chat.completion.chunk"}
            self._start_events()
            self._event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None}]})
            with srv.lock:
                r = generate_ids(srv.model, srv.tokenizer, ids, settings, srv.is_chat, on_text=lambda t: self._event(
                    {**chunk, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}))
            self._event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": r.finish_reason}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                self._event({**chunk, "choices": [], "usage": usage(r)})
            self._event("[DONE]")
            self._end_events()
            return
        with srv.lock:
            r = generate_ids(srv.model, srv.tokenizer, ids, settings, srv.is_chat)
        self._json(200, {**base, "object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                                      "finish_reason": r.finish_reason}],
                         "usage": usage(r)})


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    return host in ("localhost", "::1") or host.startswith("127.")
