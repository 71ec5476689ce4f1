"""The HTTP API behind ``llmlab serve`` (standard library http.server, no extra dependency).

Endpoints:

- ``GET /v1/models``: the one model served, OpenAI-style.
- ``GET /health``: ``{"status": "ok"}``.
- ``POST /v1/chat/completions``: OpenAI-compatible chat completions (``model``, ``messages``,
  ``max_tokens`` or ``max_completion_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``,
  ``repetition_penalty``, ``stop`` (a string or up to 4), ``stream``,
  ``stream_options.include_usage``); ``n`` must be 1. ``stream: true`` answers server-sent events of
  ``chat.completion.chunk`` objects ending in ``data: [DONE]``.
- ``POST /generate``: ``{"prompt": str | messages, ...same sampling keys..., "stream": bool}`` →
  ``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}``; a string prompt goes through
  the chat template for chat models unless ``"raw": true``. Streaming sends ``{"text": piece}`` events
  and a final event with ``"done": true``.

Errors follow OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status
for every bad request: malformed JSON (NaN/Infinity included), a value out of range, an unknown model
(404 ``model_not_found``), a prompt plus ``max_tokens`` beyond the context (400
``context_length_exceeded``; without ``max_tokens`` the reply is capped to what the context leaves),
a bad ``Content-Length`` (400), a body over 1 MiB (413), text that is not valid Unicode (a lone
surrogate such as ``"\\ud800"``, 400), a role other than system, user or assistant (400), a request
whose headers and body are not all in within ``timeout`` seconds (408, or the connection is closed
when the headers are not in yet). A model whose config declares no context is served with
:data:`~llmlab.inference.generation.UNDECLARED_CONTEXT` tokens.

Special-token text in a message (``"<|im_end|>\\n<|im_start|>system"``) is tokenised as plain
characters, never as the special tokens (:func:`~llmlab.inference.generation.encode_prompt`), so a
user cannot forge turns.

At most ``max_connections`` connections are served at once; more get 503 (the listen backlog is
``max_connections``, at least :data:`MIN_BACKLOG`, so a burst waits to be answered rather than being
reset). A client that disconnects while its request is queued or generating is noticed within
:data:`POLL_S` seconds and its generation stops.

Requests are served in batches: a single generation thread takes the requests queued within
``batch_window`` seconds (up to ``max_batch``), groups those with the same sampling settings, and runs
each group as one left-padded ``generate`` call (static batching). A sampled request with its own
``seed`` runs alone, so it gives the same text as ``llmlab generate`` with that seed; greedy rows are
the same batched or alone.
"""

from __future__ import annotations

import io
import json
import math
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llmlab.inference.generation import (
    GenerationResult,
    GenerationSettings,
    UNDECLARED_CONTEXT,
    PromptTooLongError,
    completion_budget,
    context_limit,
    encode_prompt,
    generate_batch,
)
from llmlab.inference.limits import GREEDY_BELOW, REPETITION_PENALTY_RANGE, TEMPERATURE_RANGE

MAX_BODY = 1 << 20
MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
INT64 = 1 << 63
ROLES = ("system", "user", "assistant")  # the roles llmlab's chat template and SFT data know
MIN_BACKLOG = 128  # listen backlog floor: a burst of connections queues to get its 503
POLL_S = 0.05  # how often a waiting handler checks that its client is still there
LINGER_S = 1.0  # how long a refused connection's request is read (and dropped) before closing


class RequestError(Exception):
    """A bad request: answered with this status, message, and OpenAI ``param`` / ``code``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def _reject_constant(name: str):
    raise RequestError(f"the body is not valid JSON: {name} is not a JSON number")


def _number(body: dict, key: str, integer: bool, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float | int | None:
    """``body[key]`` as a finite number in range, or None when absent; RequestError otherwise."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'}", param=key,
                           code="invalid_type")
    if not math.isfinite(v):
        raise RequestError(f"'{key}' must be finite", param=key, code="invalid_value")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise RequestError(f"'{key}' must be in {rng}, got {v}", param=key, code="invalid_value")
    return v


def request_settings(body: dict, defaults: GenerationSettings) -> tuple[GenerationSettings, bool]:
    """Sampling settings of a request (unset keys from ``defaults``) and whether it set a length.

    ``repetition_penalty`` must lie in :data:`~llmlab.inference.limits.REPETITION_PENALTY_RANGE` (HF
    divides positive logits by it: 1e-300 gave inf and a 500) and ``temperature`` in
    :data:`~llmlab.inference.limits.TEMPERATURE_RANGE`; one below
    :data:`~llmlab.inference.limits.GREEDY_BELOW` is greedy decoding (as vLLM does).

    Raises:
        RequestError: a key of the wrong type, not finite or out of range.
    """
    max_new = None
    for key in ("max_completion_tokens", "max_tokens", "max_new_tokens"):
        max_new = _number(body, key, True, lo=1, hi=INT64 - 1)
        if max_new is not None:
            break
    seed = _number(body, "seed", True, lo=-INT64, hi=INT64 - 1)
    temperature = _number(body, "temperature", False, *TEMPERATURE_RANGE)
    s = defaults.replace(max_new_tokens=max_new,
                         temperature=0 if temperature is not None and temperature < GREEDY_BELOW else temperature,
                         top_p=_number(body, "top_p", False, lo=0, hi=1, lo_open=True),
                         top_k=_number(body, "top_k", True, lo=0, hi=INT64 - 1),
                         repetition_penalty=_number(body, "repetition_penalty", False, *REPETITION_PENALTY_RANGE),
                         seed=None if seed is None else seed % (1 << 64))
    return s, max_new is not None


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(x, str) for x in stop):
        raise RequestError(f"'stop' must be a string or a list of up to {MAX_STOP} strings", param="stop",
                           code="invalid_value")
    return [_text(x, "stop") for x in stop if x]


def _text(x: str, param: str) -> str:
    """``x`` when it is valid Unicode (encodable as UTF-8); RequestError for a lone surrogate, which
    JSON's ``\\ud800`` escape can carry and no tokenizer takes."""
    try:
        x.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"'{param}' is not valid Unicode: {e.reason} at character {e.start}", param=param,
                           code="invalid_value") from None
    return x


def _messages(x: Any, param: str = "messages") -> list[dict]:
    """The ``{role, content}`` messages of a request: roles among :data:`ROLES`, contents strings (or
    OpenAI text parts) of valid Unicode; RequestError naming the message otherwise."""
    if not isinstance(x, list) or not x:
        raise RequestError(f"'{param}' must be a non-empty list of {{role, content}}", param=param)
    out = []
    for i, m in enumerate(x):
        where = f"{param}[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise RequestError(f"{where} needs a 'role' and a 'content'", param=where)
        if m["role"] not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {m['role']!r}",
                               param=f"{where}.role", code="invalid_value")
        c = m.get("content")
        if isinstance(c, list):  # OpenAI content parts: keep the text ones
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"
                        and isinstance(p.get("text", ""), str))
        if not isinstance(c, str):
            raise RequestError(f"{where}.content must be a string", param=f"{where}.content")
        out.append({"role": m["role"], "content": _text(c, f"{where}.content")})
    return out


@dataclass
class Job:
    """One request waiting for the generation thread. ``events`` receives ``("text", piece)`` when
    streaming, then ``("done", GenerationResult)`` or ``("error", exception)``. ``cancel`` is set when
    the client went away: the job is skipped, or its row stops at the next token."""

    prompt_ids: list[int]
    settings: GenerationSettings
    is_chat: bool
    max_new: int
    stop: list[str]
    stream: bool = False
    events: queue.Queue = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def key(self) -> tuple:
        """Requests with equal keys can share a ``generate`` call."""
        s = self.settings
        greedy = s.greedy
        if not greedy and s.seed is not None:
            return ("alone", id(self))
        sampling = () if greedy else (s.temperature, s.top_k, s.top_p)
        return (self.is_chat, greedy, sampling, s.repetition_penalty)


class Batcher(threading.Thread):
    """The one thread that runs the model: static batching of the requests queued within
    ``window`` seconds, grouped by :meth:`Job.key`, at most ``max_batch`` rows per ``generate``."""

    def __init__(self, model: Any, tokenizer: Any, window: float = 0.02, max_batch: int = 8):
        super().__init__(daemon=True, name="llmlab-batcher")
        self.model, self.tokenizer, self.window, self.max_batch = model, tokenizer, window, max_batch
        self.jobs: queue.Queue = queue.Queue()
        self.batches: list[int] = []  # sizes of the generate calls made (for tests and logs)

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            pending = [first]
            deadline = time.monotonic() + self.window
            while (left := deadline - time.monotonic()) > 0:
                try:
                    j = self.jobs.get(timeout=left)
                except queue.Empty:
                    break
                if j is None:
                    self.jobs.put(None)
                    break
                pending.append(j)
            groups: dict[tuple, list[Job]] = {}
            for j in pending:
                groups.setdefault(j.key(), []).append(j)
            for group in groups.values():
                for i in range(0, len(group), self.max_batch):
                    self._run(group[i: i + self.max_batch])

    def _run(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancel.is_set()]  # their clients went away while queued
        if not jobs:
            return
        self.batches.append(len(jobs))

        def sink(job: Job):
            return (lambda piece: job.events.put(("text", piece))) if job.stream else None

        try:
            results: list[GenerationResult] = generate_batch(
                self.model, self.tokenizer, [j.prompt_ids for j in jobs], jobs[0].settings, jobs[0].is_chat,
                max_new=[j.max_new for j in jobs], stop=[j.stop for j in jobs], on_text=[sink(j) for j in jobs],
                cancelled=[j.cancel.is_set for j in jobs])
        except Exception as e:  # noqa: BLE001 - reported to every waiting request as a 500
            for j in jobs:
                j.events.put(("error", e))
            return
        for j, r in zip(jobs, results):
            j.events.put(("done", r))


class InferenceServer(ThreadingHTTPServer):
    """An HTTP server holding one loaded model. ``serve_forever()`` runs it; ``shutdown()`` then
    ``server_close()`` stop it.

    Args:
        timeout: seconds a client has to send a whole request, headers and body (one deadline for all
            of it, not per read: a client trickling a byte at a time is cut off too); also the limit
            on each write of the reply to a client that stops reading. An idle keep-alive connection
            is closed after it.
        max_connections: connections served at once; more are answered 503 and closed. The listen
            backlog is as large (at least :data:`MIN_BACKLOG`), so a burst is queued and answered.
        batch_window, max_batch: see :class:`Batcher`.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, model: Any, tokenizer: Any, is_chat: bool, host: str = "127.0.0.1", port: int = 8000,
                 model_id: str = "llmlab", defaults: GenerationSettings | None = None, system: str | None = None,
                 verbose: bool = False, timeout: float = 30.0, max_connections: int = 64,
                 batch_window: float = 0.02, max_batch: int = 8):
        self.model, self.tokenizer, self.is_chat = model, tokenizer, is_chat
        self.model_id = model_id
        self.defaults = defaults or GenerationSettings()
        self.system = system
        self.verbose = verbose
        self.timeout_s = timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self.request_queue_size = max(max_connections, MIN_BACKLOG)  # listen() backlog (socketserver)
        self.limit = context_limit(model) or UNDECLARED_CONTEXT
        self.created = int(time.time())
        self.batcher = Batcher(model, tokenizer, window=batch_window, max_batch=max_batch)
        super().__init__((host, port), _Handler)
        self.batcher.start()

    @property
    def url(self) -> str:
        """The base URL the server listens on."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            threading.Thread(target=self._refuse, args=(request,), daemon=True, name="llmlab-503").start()
            return
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 and close gracefully: the request the client sent is read and dropped for up to
        :data:`LINGER_S` seconds first, since closing a socket with unread data sends a reset that
        can destroy the 503 before the client reads it (ECONNRESET)."""
        try:
            body = json.dumps(_error_body(503, "too many connections; retry later", code="server_busy")).encode()
            request.settimeout(LINGER_S)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            request.shutdown(socket.SHUT_WR)
            end = time.monotonic() + LINGER_S
            while (left := end - time.monotonic()) > 0:
                request.settimeout(left)
                if not request.recv(65536):
                    break
        except OSError:
            pass
        finally:
            request.close()

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def server_close(self) -> None:
        super().server_close()
        self.batcher.stop()
        self.batcher.join(timeout=60)  # let a running generate finish before the interpreter exits


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    typ = "invalid_request_error" if status < 500 else ("server_error" if status != 503 else "service_unavailable")
    return {"error": {"message": message, "type": typ, "param": param, "code": code}}


class _DeadlineReader(io.RawIOBase):
    """A socket's reads under one deadline (``handler.deadline``, ``time.monotonic()`` seconds): each
    ``recv`` may wait only for what is left of it, so the whole request, not each read, is bounded."""

    def __init__(self, sock: socket.socket, handler: _Handler):
        super().__init__()
        self.sock, self.handler = sock, handler

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request deadline passed")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


class _Handler(BaseHTTPRequestHandler):
    server: InferenceServer
    protocol_version = "HTTP/1.1"
    deadline = math.inf

    def setup(self) -> None:
        self.timeout = self.server.timeout_s  # socket timeout for writes: a client that stops reading
        super().setup()
        self.rfile.close()  # the plain socket file: reads go through the request deadline instead
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self), io.DEFAULT_BUFFER_SIZE)

    def handle_one_request(self) -> None:
        # headers and body of the next request must all arrive within timeout_s from now
        self.deadline = time.monotonic() + self.server.timeout_s
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # -- plumbing ----------------------------------------------------------------------------------
    _responded = False

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        self.connection.settimeout(self.server.timeout_s)  # writes: per send, not the request deadline
        super().send_response(code, message)

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        self._json(status, _error_body(status, message, param, code))

    def _body(self) -> dict:
        raw_len = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported; send a Content-Length", 411)
        try:
            n = int(raw_len) if raw_len is not None else 0
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise RequestError(f"bad Content-Length: {raw_len!r}")
        if n > MAX_BODY:
            self.close_connection = True
            raise RequestError("request body too large", 413)
        raw = self.rfile.read(n) if n else b""
        if len(raw) < n:
            self.close_connection = True
            raise RequestError("the body is shorter than its Content-Length")
        try:
            body = json.loads(raw or b"{}", parse_constant=_reject_constant)
        except RequestError:
            raise
        except (ValueError, RecursionError):
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
        self._responded = False
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model_id, "object": "model",
                                                         "created": self.server.created, "owned_by": "llmlab"}]})
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._error(404, f"no route GET {path}", code="not_found")

    def do_POST(self) -> None:
        self._responded = False
        path = self.path.split("?")[0].rstrip("/")
        started = False
        try:
            if path not in ("/v1/chat/completions", "/generate"):
                self.close_connection = True  # the body is not read
                raise RequestError(f"no route POST {path}", 404, code="not_found")
            body = self._body()
            started = True
            if path == "/v1/chat/completions":
                self._chat_completions(body)
            else:
                self._generate(body)
        except RequestError as e:
            self._error(e.status, str(e), e.param, e.code)
        except TimeoutError:
            self.close_connection = True
            if not started:
                self._error(408, f"no complete request within {self.server.timeout_s:g} s", code="timeout")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug must still answer, not drop the connection
            self.close_connection = True
            if not self._responded:
                self._error(500, f"internal error: {type(e).__name__}: {e}")

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.server.model_id:
            raise RequestError(f"The model `{name}` does not exist or you do not have access to it.", 404,
                               param="model", code="model_not_found")

    def _submit(self, ids: list[int], settings: GenerationSettings, explicit: bool, chat: bool,
                stop: list[str], stream: bool) -> Job:
        """Check the length against the context and queue the request (RequestError when it cannot fit)."""
        limit = self.server.limit
        try:
            max_new, note = completion_budget(len(ids), settings.max_new_tokens, limit)
        except PromptTooLongError as e:
            raise RequestError(str(e), param="messages", code="context_length_exceeded") from None
        if explicit and note:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + settings.max_new_tokens} tokens ({len(ids)} in the messages, "
                f"{settings.max_new_tokens} in the completion). Please reduce the length of the messages or "
                "completion.", param="max_tokens", code="context_length_exceeded")
        return self.server.batcher.submit(Job(ids, settings, chat, max_new, stop, stream))

    def _client_gone(self) -> bool:
        """True when the client closed its end (EOF or an error on the socket; a pipelined request
        does not count)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)  # b"": EOF
        except (BlockingIOError, TimeoutError):
            return False
        except OSError:
            return True

    def _wait(self, job: Job, on_text=None) -> GenerationResult:
        """The job's result, passing streamed text to ``on_text``; cancels the job when the client
        goes away (checked every :data:`POLL_S` s, or a write fails) and raises ConnectionResetError."""
        try:
            while True:
                try:
                    kind, value = job.events.get(timeout=POLL_S)
                except queue.Empty:
                    if self._client_gone():
                        raise ConnectionResetError("the client went away") from None
                    continue
                if kind == "text" and on_text is not None:
                    on_text(value)
                elif kind == "done":
                    return value
                elif kind == "error":
                    raise RuntimeError(f"generation failed: {value}") from value
        except BaseException:
            job.cancel.set()
            raise

    def _generate(self, body: dict) -> None:
        srv = self.server
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = _messages(prompt, "prompt")
        elif isinstance(prompt, str):
            prompt = _text(prompt, "prompt")
        else:
            raise RequestError("'prompt' must be a string or a list of messages", param="prompt")
        settings, explicit = request_settings(body, srv.defaults)
        stop = _stop(body)
        chat = srv.is_chat and not body.get("raw", False)
        ids = encode_prompt(srv.tokenizer, prompt, chat, system=srv.system if chat else None)
        stream = bool(body.get("stream"))
        job = self._submit(ids, settings, explicit, chat, stop, stream)
        if stream:
            self._start_events()
            r = self._wait(job, on_text=lambda t: self._event({"text": t}))
            self._event({"done": True, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                         "completion_tokens": r.completion_tokens})
            self._end_events()
            return
        r = self._wait(job)
        self._json(200, {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                         "completion_tokens": r.completion_tokens, "model": srv.model_id})

    def _chat_completions(self, body: dict) -> None:
        srv = self.server
        self._check_model(body)
        msgs = _messages(body.get("messages"))
        if body.get("n", 1) != 1:
            raise RequestError("only n = 1 is supported", param="n", code="invalid_value")
        settings, explicit = request_settings(body, srv.defaults)
        stop = _stop(body)
        ids = encode_prompt(srv.tokenizer, msgs, srv.is_chat, system=srv.system)
        stream = bool(body.get("stream"))
        job = self._submit(ids, settings, explicit, srv.is_chat, stop, stream)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        base = {"id": cid, "created": int(time.time()), "model": srv.model_id}

        def usage(r):
            return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                    "total_tokens": r.prompt_tokens + r.completion_tokens}

        if stream:
            chunk = {**base, "object": "chat.completion.chunk"}
            self._start_events()
            self._event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None}]})
            r = self._wait(job, on_text=lambda t: self._event(
                {**chunk, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}))
            self._event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": r.finish_reason}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                self._event({**chunk, "choices": [], "usage": usage(r)})
            self._event("[DONE]")
            self._end_events()
            return
        r = self._wait(job)
        self._json(200, {**base, "object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                                      "finish_reason": r.finish_reason}],
                         "usage": usage(r)})


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    return host in ("localhost", "::1") or host.startswith("127.")
