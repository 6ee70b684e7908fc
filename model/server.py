"""The worker's HTTP API: the OpenAI chat subset vLLM speaks, plus vLLM's extras.

Routes: POST /v1/chat/completions (SSE when `stream`), GET /v1/models,
POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA
API; replacing a loaded name needs `load_inplace: true`, as in vLLM),
GET /health, GET /metrics, POST /sleep and /wake_up. Every refusal is a
vLLM-style error body (model.errors).

Handlers validate (model.protocol), tokenize on a worker thread, hand a
`Sequence` to the engine thread and relay the text it emits through an asyncio
queue; neither torch nor tokenization runs on this loop, so /health always
answers.

Who may do what: /health and /metrics are open (probes, Prometheus) but show
file-system paths only to a caller holding the key. With a key configured every
other route needs it. The control routes (sleep, wake, adapter load/unload)
always need it: a worker started without a key refuses them, because any local
process could otherwise put it to sleep or replace what it serves. The bot
generates a key per run for the worker it starts.

The serving state is an explicit machine (`WorkerState`): serving -> sleeping
(chat refused at once; weights released once running requests finish) ->
waking -> serving, and draining (SIGTERM) from anywhere. A wake that arrives
before a pending sleep took effect cancels it, so no ordering of /sleep,
/wake_up, loads and requests can leave requests admitted but never run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Optional

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from model import protocol
from model.adapters import AdapterInUse, AdapterTable, AdapterVersion, read_adapter, within_roots
from model.engine import Engine, QueueFull, Sequence
from model.errors import APIError, bad_request
from model.metrics import WorkerMetrics
from model.prompt import tokenize_chat

log = logging.getLogger("loopcord.worker")

RETRY_AFTER_S = 1  # what a 429 asks the client to wait
OPEN_PATHS = ("/health", "/metrics")  # readable without the key (probes, Prometheus)
CONTROL_PATHS = ("/sleep", "/wake_up", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
# Request bodies: a whole context of text, escaped as JSON \uXXXX (6 bytes a character, ~4
# characters a token), fits; a 10 MB body is refused (413) before it is read, parsed or tokenized.
MIN_BODY_BYTES = 1 << 20
LARGE_PROMPT_CHARS = 64 * 1024  # from here a prompt is tokenized apart from the short ones (16 a message: its frame)
BODY_BYTES_PER_CONTEXT_TOKEN = 32
# The request line and each header line: aiohttp's (and nginx's) 8 KB. Longer is refused with a
# JSON 400 before any handler runs; whatever a request needs to say that is long goes in its body.
MAX_LINE_BYTES = 8190


def max_body_bytes(max_context: int) -> int:
    return max(MIN_BODY_BYTES, max_context * BODY_BYTES_PER_CONTEXT_TOKEN)


class WorkerState(StrEnum):
    SERVING = "serving"
    SLEEPING = "sleeping"  # chat refused; weights released (or about to be, once idle)
    WAKING = "waking"  # weights coming back; chat refused until serving
    DRAINING = "draining"  # shutting down: chat and control refused, running requests finish


@dataclass
class Worker:
    """Everything the handlers share: the engine and the serving state."""

    engine: Engine
    tokenizer: object  # this loop's own copy, used only on `tokenize_pool`'s one thread
    base_id: str
    base_path: str
    device: str
    dtype: str
    max_context: int
    linear_shapes: dict
    adapters: AdapterTable
    metrics: WorkerMetrics
    api_key: Optional[str] = None
    adapter_roots: list[Path] = field(default_factory=list)  # where lora_path may point
    created: int = field(default_factory=lambda: int(time.time()))
    state: WorkerState = WorkerState.SERVING
    active: int = 0  # chat requests being answered (drain waits for 0)
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tokenize_pool: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize"))
    # Prompts of LARGE_PROMPT_CHARS or more are tokenized on their own thread with their own
    # tokenizer copy: a megabyte of messages takes seconds, and a short chat must not wait behind it.
    large_tokenize_pool: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize-large"))
    _large_tokenizer: Optional[object] = None
    _sleep_generation: int = 0  # bumped by every sleep and wake; a stale offload does nothing
    _pending_offload: Optional[concurrent.futures.Future] = None
    _sleep_cancelled: Optional[asyncio.Future] = None  # resolved by the wake that cancels a pending sleep

    def fingerprint(self, adapter: Optional[AdapterVersion]) -> str:
        """The `system_fingerprint` of a response served by `adapter` (None: the base alone)."""
        return protocol.system_fingerprint(self.base_path, self.dtype, adapter.digest or adapter.internal
                                           if adapter is not None else None)

    # ---------------- state ----------------

    @property
    def sleeping(self) -> bool:
        return self.state in (WorkerState.SLEEPING, WorkerState.WAKING)

    @property
    def draining(self) -> bool:
        return self.state == WorkerState.DRAINING

    def begin_drain(self) -> None:
        self.state = WorkerState.DRAINING

    def refuse_if_unavailable(self) -> None:
        if self.state == WorkerState.DRAINING:
            raise APIError(503, "the model worker is shutting down; retry on another worker or later")
        if self.state == WorkerState.SLEEPING:
            raise APIError(503, "the model worker is asleep (POST /wake_up to wake it)")
        if self.state == WorkerState.WAKING:
            raise APIError(503, "the model worker is waking up; retry in a moment",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def _offload_if_current(self, generation: int) -> bool:
        """Engine thread, when idle: release the weights unless a wake came in meanwhile."""
        if generation != self._sleep_generation:
            return False
        self.engine.offload()
        return True

    async def go_to_sleep(self) -> None:
        """Refuse chat now; release the weights once running requests have finished."""
        # Transitions run as tasks the caller only awaits: one that gives up half-way
        # (disconnect, timeout) cannot leave the state between two states.
        await asyncio.shield(asyncio.ensure_future(self._sleep()))

    async def wake(self) -> None:
        """Cancel a pending sleep or bring the weights back; serving again when this returns."""
        await asyncio.shield(asyncio.ensure_future(self._wake()))

    async def _sleep(self) -> None:
        async with self.state_lock:
            if self.state == WorkerState.DRAINING:
                self.refuse_if_unavailable()
            if self.state == WorkerState.SERVING:
                self.state = WorkerState.SLEEPING
                self._sleep_generation += 1
                generation = self._sleep_generation
                self._pending_offload = self.engine.call(lambda: self._offload_if_current(generation),
                                                         when_idle=True)
                self._sleep_cancelled = asyncio.get_running_loop().create_future()
            pending, cancelled = self._pending_offload, self._sleep_cancelled
        if pending is not None:  # waited for outside the lock: a wake may cancel it meanwhile
            offload = asyncio.wrap_future(pending)
            await asyncio.wait([offload, cancelled], return_when=asyncio.FIRST_COMPLETED)
            if offload.done() and offload.result():
                log.info("asleep: weights released from %s", self.device)

    async def _wake(self) -> None:
        async with self.state_lock:
            if self.state == WorkerState.DRAINING:
                self.refuse_if_unavailable()
            if self.state != WorkerState.SLEEPING:
                return
            self.state = WorkerState.WAKING
            self._sleep_generation += 1  # an offload still waiting for idle now does nothing
            self._pending_offload = None
            if self._sleep_cancelled is not None and not self._sleep_cancelled.done():
                self._sleep_cancelled.set_result(None)
            try:
                # Runs on the engine thread after any offload already running there, so the
                # engine is never left asleep behind a "serving" worker.
                await asyncio.wrap_future(self.engine.call(self.engine.reload))
            except Exception:
                self.state = WorkerState.SLEEPING
                raise
            self.state = WorkerState.SERVING
        log.info("awake on %s", self.device)

    # ---------------- auth ----------------

    def holds_key(self, request: web.Request) -> bool:
        """A bearer token equal to the key (scheme case-insensitive, constant-time compare)."""
        if not self.api_key:
            return False
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode("utf-8", "replace"), self.api_key.encode("utf-8"))

    def authorize(self, request: web.Request) -> None:
        if request.path in OPEN_PATHS:
            return
        if request.path in CONTROL_PATHS and not self.api_key:
            raise APIError(403, f"{request.path} is disabled: this worker was started without a key. Start it "
                                "with a key in the environment variable named by model.api_key_env "
                                "(LOOPCORD_WORKER_KEY by default; the bot sets one for the worker it starts) "
                                "and send 'Authorization: Bearer <key>'")
        if self.api_key and not self.holds_key(request):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    # ---------------- adapters ----------------

    def _allowed_path(self, path: str) -> str:
        resolved = within_roots(path, self.adapter_roots)
        if resolved is None:  # same answer whether or not the path exists
            raise APIError(400, f"lora_path {path!r} is outside the adapter directories this worker may load "
                                "from (the registry, configured adapters and --adapter-root)", param="lora_path")
        return str(resolved)

    async def load_adapter(self, name: str, path: str, inplace: bool) -> None:
        """Load (or, with `inplace`, hot-swap) `name`; the old version serves until its requests finish."""
        if name in self.adapters and not inplace:  # vLLM's refusal, word for word
            raise bad_request(f"The lora adapter '{name}' has already been loaded. If you want to load the "
                              "adapter in place, set 'load_inplace' to True.", "lora_name")
        real = self._allowed_path(path)
        loop = asyncio.get_running_loop()
        files = await loop.run_in_executor(None, read_adapter, real, self.linear_shapes)
        async with self.load_lock:
            internal = self.adapters.new_internal_name()
            try:
                await asyncio.wrap_future(self.engine.call(lambda: self.engine.load_adapter(internal, real, files)))
            except Exception as exc:
                raise APIError(400, f"cannot load adapter {name!r} from {path!r}: {exc}", param="lora_path") from None
            stale = self.adapters.publish(name, internal, path, files.digest)
            self.metrics.adapter_loads += 1
            if stale:
                await asyncio.wrap_future(self.engine.call(lambda: self.engine.delete_adapter(stale)))
        log.info("adapter %r -> %s (internal %s)", name, path, internal)

    async def unload_adapter(self, name: str) -> None:
        try:
            internal = self.adapters.unload(name)
        except KeyError:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name") from None
        except AdapterInUse as exc:
            raise APIError(409, f"{exc}; retry when they finish", param="lora_name") from None
        await asyncio.wrap_future(self.engine.call(lambda: self.engine.delete_adapter(internal)))

    def release_now(self, seq: Sequence) -> None:
        """Give back an adapter hold for a request the engine never saw."""
        version, seq.adapter = seq.adapter, None
        if version is not None and self.adapters.release(version):
            self.engine.call(lambda: self.engine.delete_adapter(version.internal))

    # ---------------- chat ----------------

    def prompt_ids(self, messages: list[dict], tokenizer: Optional[object] = None) -> list[int]:
        """Token ids of the prompt; message content never becomes control tokens (model.prompt)."""
        try:
            return tokenize_chat(tokenizer or self.tokenizer, messages, generation_prompt=True).input_ids
        except Exception as exc:  # the template itself rejects the conversation (e.g. role order)
            raise bad_request(f"the chat template rejected the messages: {type(exc).__name__}: {exc}",
                              "messages") from None

    async def make_sequence(self, req: protocol.ChatRequest, queue: asyncio.Queue) -> tuple[Sequence, str]:
        """Resolve the model name, build the prompt, check the context: 404/400 otherwise.

        Returns the submitted sequence and its `system_fingerprint`, from the adapter version
        acquired here (not `seq.adapter`, which the engine clears when the request ends). The
        engine is told the request is coming while it is tokenized, so a burst starts as one batch."""
        self.refuse_if_unavailable()
        if req.model not in (None, self.base_id) and req.model not in self.adapters:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model")
        self.engine.expect()
        try:
            loop = asyncio.get_running_loop()
            if sum(len(str(m.get("content") or "")) + 16 for m in req.messages) < LARGE_PROMPT_CHARS:
                ids = await loop.run_in_executor(self.tokenize_pool, self.prompt_ids, req.messages)
            else:
                if self._large_tokenizer is None:
                    self._large_tokenizer = copy.deepcopy(self.tokenizer)
                ids = await loop.run_in_executor(self.large_tokenize_pool, self.prompt_ids, req.messages,
                                                 self._large_tokenizer)
            max_tokens = protocol.check_context(len(ids), req.max_tokens, self.max_context)
            # From here to submit nothing awaits: a sleep or drain cannot slip in between the
            # check and the hand-over, so the engine is never asleep under an admitted request.
            self.refuse_if_unavailable()
            adapter = None
            if req.model not in (None, self.base_id):
                adapter = self.adapters.acquire(req.model)
                if adapter is None:  # unloaded while we tokenized
                    raise APIError(404, f"The model `{req.model}` does not exist.", param="model")
            seq = Sequence(prompt_ids=ids, max_tokens=max_tokens,
                           emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                           temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
                           ignore_eos=req.ignore_eos, adapter=adapter)
        except BaseException:
            self.engine.unexpect()  # refused (or the client left) before it reached the engine
            raise
        try:
            self.engine.submit(seq, expected=True)  # settles the announcement, queued or not
        except QueueFull:
            self.release_now(seq)
            raise APIError(429, f"the model worker's queue is full ({self.engine.max_queue} waiting); retry shortly",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except BaseException:
            self.release_now(seq)
            raise
        return seq, self.fingerprint(adapter)


async def _body(request: web.Request) -> bytes:
    """The raw body, refused (413) before reading when it declares more than the limit."""
    limit = request.app["max_body_bytes"]
    if request.content_length is not None and request.content_length > limit:
        raise APIError(413, f"the request body is {request.content_length} bytes; the limit is {limit} bytes "
                            "(a whole context of text)")
    return await request.read()  # aiohttp stops reading past client_max_size (413 as well)


def _sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


def _stop_reason(seq: Sequence, reason: str):
    """vLLM's `stop_reason`: the stop string that ended the answer; None for EOS and length."""
    stops = getattr(seq, "stops", None)
    return getattr(stops, "matched", None) if reason == "stop" else None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    worker: Worker = request.app["worker"]
    worker.refuse_if_unavailable()
    req = protocol.parse_chat_request(await _body(request))
    queue: asyncio.Queue = asyncio.Queue()
    seq, fingerprint = await worker.make_sequence(req, queue)
    worker.active += 1
    try:
        name = req.model or worker.base_id
        if req.stream:
            return await _stream(request, req, seq, queue, name, fingerprint)
        return await _complete(seq, queue, name, fingerprint)
    finally:
        worker.active -= 1
        if seq.finish_reason is None:  # client left or the handler failed: free the slot now
            worker.engine.cancel(seq)


async def _complete(seq: Sequence, queue: asyncio.Queue, name: str, fingerprint: str) -> web.Response:
    parts = []
    while True:
        event = await queue.get()
        if event[0] == "delta":
            parts.append(event[1])
        elif event[0] == "error":
            raise APIError(500, event[1])
        else:
            _, reason, prompt_tokens, completion_tokens = event
            usage = protocol.usage_object(prompt_tokens, completion_tokens)
            body = protocol.completion_object(protocol.new_completion_id(), name, "".join(parts), reason, usage,
                                              stop_reason=_stop_reason(seq, reason), fingerprint=fingerprint)
            return web.json_response(body, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def _stream(request, req: protocol.ChatRequest, seq: Sequence, queue: asyncio.Queue,
                  name: str, fingerprint: str) -> web.StreamResponse:
    """SSE: a role chunk, content chunks, a finish chunk, a usage chunk only if asked, [DONE]."""
    cid, created = protocol.new_completion_id(), int(time.time())
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)

    def chunk(*args, **kw) -> bytes:
        return _sse(protocol.chunk_object(cid, name, created, *args, fingerprint=fingerprint, **kw))

    await response.write(chunk({"role": "assistant", "content": ""}))
    while True:
        event = await queue.get()
        if event[0] == "delta":
            await response.write(chunk({"content": event[1]}))
        elif event[0] == "error":
            await response.write(_sse(APIError(500, event[1]).body()))
            break
        else:
            _, reason, prompt_tokens, completion_tokens = event
            await response.write(chunk({}, finish_reason=reason, stop_reason=_stop_reason(seq, reason)))
            if req.include_usage:  # as OpenAI and vLLM: only with stream_options.include_usage
                await response.write(chunk(usage=protocol.usage_object(prompt_tokens, completion_tokens)))
            break
    await response.write(_sse("[DONE]"))
    await response.write_eof()
    return response


async def list_models(request: web.Request) -> web.Response:
    worker: Worker = request.app["worker"]
    return web.json_response(protocol.model_list_object(worker.base_id, worker.base_path,
                                                        worker.adapters.paths(), worker.created,
                                                        worker.max_context))


async def load_lora_adapter(request: web.Request) -> web.Response:
    worker: Worker = request.app["worker"]
    body = protocol.parse_body(protocol.LoadLoRABody, await _body(request))
    if worker.draining:
        worker.refuse_if_unavailable()
    if body.lora_name == worker.base_id:
        raise bad_request(f"'{body.lora_name}' is the base model's name; choose another lora_name", "lora_name")
    await worker.load_adapter(body.lora_name, body.lora_path, body.load_inplace)
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    worker: Worker = request.app["worker"]
    body = protocol.parse_body(protocol.UnloadLoRABody, await _body(request))
    await worker.unload_adapter(body.lora_name)
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _memory(device: str) -> dict:
    out = {"rss_bytes": None}
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    if device.startswith("cuda"):
        import torch

        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
        out["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
    return out


async def health(request: web.Request) -> web.Response:
    """Serving state and load for anyone; names and paths only for a caller holding the key."""
    worker: Worker = request.app["worker"]
    failing = not worker.engine.healthy
    body = {
        "status": "unhealthy" if failing else "ok" if worker.state == WorkerState.SERVING else str(worker.state),
        "failures_in_a_row": worker.engine.failures_in_a_row,
        "state": str(worker.state),
        "loaded": True,
        "queue_depth": worker.engine.waiting(),
        "running": worker.engine.running(),
        "active_requests": worker.active,
        "device": worker.device,
        "dtype": worker.dtype,
        "max_context": worker.max_context,
        "memory": {**_memory(worker.device), "kv_cache_budget_bytes": worker.engine.kv_cache_bytes},
        "sleeping": worker.sleeping,
        "draining": worker.draining,
        "auth": "required" if worker.api_key else "none",
    }
    if worker.holds_key(request):
        body.update(base=worker.base_id, base_path=worker.base_path, adapters=worker.adapters.paths(),
                    adapter_requests=worker.adapters.holds())
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    worker: Worker = request.app["worker"]
    worker.metrics.set_load(worker.engine.waiting(), worker.engine.running())
    return web.Response(text=worker.metrics.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def sleep(request: web.Request) -> web.Response:
    """Stop taking chat requests, let running ones finish, then free the accelerator."""
    worker: Worker = request.app["worker"]
    await worker.go_to_sleep()
    return web.json_response({"sleeping": worker.sleeping, "state": str(worker.state)})


async def wake_up(request: web.Request) -> web.Response:
    worker: Worker = request.app["worker"]
    await worker.wake()
    return web.json_response({"sleeping": worker.sleeping, "state": str(worker.state)})


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Auth, then turn every refusal into a vLLM-style error body; count chat outcomes."""
    worker: Worker = request.app["worker"]
    is_chat = request.path == "/v1/chat/completions"
    status = 200
    try:
        worker.authorize(request)
        response = await handler(request)
        status = response.status
        return response
    except APIError as exc:
        status = exc.status
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:  # aiohttp's own 404/405/413
        status = exc.status
        reason = exc.text if exc.status == 413 else f"{exc.reason}: {request.method} {request.path}"
        return web.json_response(APIError(exc.status, reason).body(), status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away
        raise
    except Exception as exc:
        status = 500
        log.exception("unhandled error on %s", request.path)
        return web.json_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status=500)
    finally:
        if is_chat:
            worker.metrics.request_done(status)


def protocol_error(status: int, exc: Optional[BaseException], message: Optional[str]) -> APIError:
    """What aiohttp refused itself (parsing, before routing and errors_middleware), as an APIError."""
    if isinstance(exc, LineTooLong):  # its own text quotes 100 bytes of the line (an Authorization header, say)
        return APIError(status, f"the request line or a header is longer than {MAX_LINE_BYTES} bytes, the most "
                                "this worker reads; send long values in the JSON body")
    if status < 500:  # aiohttp's words, first line only (the next ones echo the request under a caret)
        lines = str(getattr(exc, "message", None) or message or "").strip().splitlines()
        return APIError(status, "malformed HTTP request" + (f": {lines[0].rstrip(': ')}" if lines else ""))
    return APIError(status, "the request timed out in the server" if status == 504 else
                    "internal error while handling the request")


class _JSONErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what it refuses itself (a header over 8 KB, a bad
    request line) with the worker's JSON error body instead of plain text."""

    def handle_error(self, request, status: int = 500, exc: Optional[BaseException] = None,
                     message: Optional[str] = None) -> web.StreamResponse:
        error = protocol_error(status, exc, message)
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.info("refused a request from %s: %s", request.remote, error.message)
        if request.writer.output_size > 0:  # a response was under way: nothing else can be sent
            raise ConnectionError("response already started; cannot send the error")
        response = web.json_response(error.body(), status=status)
        response.force_close()
        return response


class _JSONErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JSONErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class WorkerRunner(web.AppRunner):
    """The AppRunner of the worker: its connections answer parser errors in the JSON error shape."""

    def __init__(self, app: web.Application, **kwargs):
        super().__init__(app, max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES, **kwargs)

    async def _make_server(self) -> web.Server:
        # aiohttp's Server builds a plain RequestHandler per connection; the same server, ours.
        plain = await super()._make_server()
        return _JSONErrorServer(plain.request_handler, request_factory=plain.request_factory,
                                handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                                **plain._kwargs)


def build_app(worker: Worker) -> web.Application:
    limit = max_body_bytes(worker.max_context)
    app = web.Application(middlewares=[errors_middleware], client_max_size=limit)
    app["worker"] = worker
    app["max_body_bytes"] = limit
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    return app
