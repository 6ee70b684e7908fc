"""The worker's HTTP API: the OpenAI chat subset vLLM speaks, plus vLLM's extras.

Routes: POST /v1/chat/completions (SSE when `stream`), GET /v1/models,
POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA
API; loading an existing name hot-swaps it), GET /health, GET /metrics,
POST /sleep and /wake_up. Every refusal is an OpenAI-style error body.

Handlers only validate, hand a `Sequence` to the engine thread and relay the
text it emits through an asyncio queue; torch never runs on this loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from aiohttp import web

from model import protocol
from model.adapters import AdapterInUse, AdapterTable, check_adapter_dir
from model.engine import Engine, QueueFull, Sequence
from model.errors import APIError, bad_request
from model.metrics import WorkerMetrics

log = logging.getLogger("loopcord.worker")

RETRY_AFTER_S = 1  # what a 429 asks the client to wait
OPEN_PATHS = ("/health", "/metrics")  # readable without the bearer token (probes, Prometheus)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}


@dataclass
class Worker:
    """Everything the handlers share: the engine and the serving state."""

    engine: Engine
    tokenizer: object
    base_id: str
    base_path: str
    device: str
    dtype: str
    max_context: int
    linear_shapes: dict
    adapters: AdapterTable
    metrics: WorkerMetrics
    api_key: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))
    sleeping: bool = False
    draining: bool = False
    active: int = 0  # chat requests being answered (drain waits for 0)
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # ---------------- adapters ----------------

    async def load_adapter(self, name: str, path: str) -> None:
        """Load (or hot-swap) `name`; the old version serves until its requests finish."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, check_adapter_dir, path, self.linear_shapes)
        async with self.load_lock:
            internal = self.adapters.new_internal_name()
            try:
                await asyncio.wrap_future(self.engine.call(lambda: self.engine.load_adapter(internal, path)))
            except Exception as exc:
                raise APIError(400, f"cannot load adapter {name!r} from {path!r}: {exc}",
                               param="lora_path", code="invalid_adapter") from None
            stale = self.adapters.publish(name, internal, path)
            self.metrics.adapter_loads += 1
            if stale:
                await asyncio.wrap_future(self.engine.call(lambda: self.engine.delete_adapter(stale)))
        log.info("adapter %r -> %s (internal %s)", name, path, internal)

    async def unload_adapter(self, name: str) -> None:
        try:
            internal = self.adapters.unload(name)
        except KeyError:
            raise APIError(404, f"adapter {name!r} is not loaded", param="lora_name", code="model_not_found") from None
        except AdapterInUse as exc:
            raise APIError(409, f"{exc}; retry when they finish", param="lora_name", code="adapter_in_use") from None
        await asyncio.wrap_future(self.engine.call(lambda: self.engine.delete_adapter(internal)))

    def release_now(self, seq: Sequence) -> None:
        """Give back an adapter hold for a request the engine never saw."""
        version, seq.adapter = seq.adapter, None
        if version is not None and self.adapters.release(version):
            self.engine.call(lambda: self.engine.delete_adapter(version.internal))

    # ---------------- chat ----------------

    def refuse_if_unavailable(self) -> None:
        if self.draining:
            raise APIError(503, "the model worker is shutting down; retry on another worker or later",
                           code="draining")
        if self.sleeping:
            raise APIError(503, "the model worker is asleep (POST /wake_up to wake it)", code="sleeping")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template itself rejects the conversation (e.g. role order)
            raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def make_sequence(self, req: protocol.ChatRequest, queue: asyncio.Queue) -> Sequence:
        """Resolve the model name, build the prompt, check the context: 404/400 otherwise."""
        adapter = None
        if req.model not in (None, self.base_id):
            adapter = self.adapters.acquire(req.model)
            if adapter is None:
                known = ", ".join([self.base_id, *self.adapters.paths()])
                raise APIError(404, f"the model {req.model!r} does not exist; served models: {known}",
                               param="model", code="model_not_found")
        loop = asyncio.get_running_loop()
        seq = Sequence(prompt_ids=[], max_tokens=1, emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                       temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
                       ignore_eos=req.ignore_eos, adapter=adapter)
        try:
            seq.prompt_ids = self.prompt_ids(req.messages)
            seq.max_tokens = protocol.check_context(len(seq.prompt_ids), req.max_tokens, self.max_context)
            self.engine.submit(seq)
        except QueueFull:
            self.release_now(seq)
            raise APIError(429, f"the model worker's queue is full ({self.engine.max_queue} waiting); retry shortly",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except BaseException:
            self.release_now(seq)
            raise
        return seq


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    worker: Worker = request.app["worker"]
    worker.refuse_if_unavailable()
    req = protocol.parse_chat_request(await _json_body(request))
    queue: asyncio.Queue = asyncio.Queue()
    seq = worker.make_sequence(req, queue)
    worker.active += 1
    try:
        name = req.model or worker.base_id
        if req.stream:
            return await _stream(request, req, seq, queue, name)
        return await _complete(seq, queue, name)
    finally:
        worker.active -= 1
        if seq.finish_reason is None:  # client left or the handler failed: free the slot now
            worker.engine.cancel(seq)


async def _complete(seq: Sequence, queue: asyncio.Queue, name: str) -> web.Response:
    parts = []
    while True:
        event = await queue.get()
        if event[0] == "delta":
            parts.append(event[1])
        elif event[0] == "error":
            raise APIError(500, event[1], code="generation_failed")
        else:
            _, reason, prompt_tokens, completion_tokens = event
            usage = protocol.usage_object(prompt_tokens, completion_tokens)
            body = protocol.completion_object(protocol.new_completion_id(), name, "".join(parts), reason, usage)
            return web.json_response(body, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def _stream(request, req, seq: Sequence, queue: asyncio.Queue, name: str) -> web.StreamResponse:
    """SSE: a role chunk, content chunks, a finish chunk, a usage chunk, [DONE]."""
    cid, created = protocol.new_completion_id(), int(time.time())
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    await response.write(_sse(protocol.chunk_object(cid, name, created, {"role": "assistant", "content": ""})))
    while True:
        event = await queue.get()
        if event[0] == "delta":
            await response.write(_sse(protocol.chunk_object(cid, name, created, {"content": event[1]})))
        elif event[0] == "error":
            await response.write(_sse(APIError(500, event[1], code="generation_failed").body()))
            break
        else:
            _, reason, prompt_tokens, completion_tokens = event
            await response.write(_sse(protocol.chunk_object(cid, name, created, {}, finish_reason=reason)))
            usage = protocol.usage_object(prompt_tokens, completion_tokens)
            await response.write(_sse(protocol.chunk_object(cid, name, created, usage=usage)))
            break
    await response.write(_sse("[DONE]"))
    await response.write_eof()
    return response


async def list_models(request: web.Request) -> web.Response:
    worker: Worker = request.app["worker"]
    return web.json_response(protocol.model_list_object(worker.base_id, worker.base_path,
                                                        worker.adapters.paths(), worker.created))


def _string_field(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"'{key}' is required (a non-empty string)", key)
    return value


async def load_lora_adapter(request: web.Request) -> web.Response:
    worker: Worker = request.app["worker"]
    body = await _json_body(request)
    name, path = _string_field(body, "lora_name"), _string_field(body, "lora_path")
    if name == worker.base_id:
        raise bad_request(f"'{name}' is the base model's name; choose another lora_name", "lora_name")
    await worker.load_adapter(name, path)
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    worker: Worker = request.app["worker"]
    name = _string_field(await _json_body(request), "lora_name")
    await worker.unload_adapter(name)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


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
    worker: Worker = request.app["worker"]
    status = "draining" if worker.draining else "sleeping" if worker.sleeping else "ok"
    return web.json_response({
        "status": status,
        "loaded": True,
        "base": worker.base_id,
        "base_path": worker.base_path,
        "adapters": worker.adapters.paths(),
        "adapter_requests": worker.adapters.holds(),
        "queue_depth": worker.engine.waiting(),
        "running": worker.engine.running(),
        "device": worker.device,
        "dtype": worker.dtype,
        "max_context": worker.max_context,
        "memory": _memory(worker.device),
        "sleeping": worker.sleeping,
        "draining": worker.draining,
    })


async def metrics(request: web.Request) -> web.Response:
    worker: Worker = request.app["worker"]
    worker.metrics.set_load(worker.engine.waiting(), worker.engine.running())
    return web.Response(text=worker.metrics.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def sleep(request: web.Request) -> web.Response:
    """Stop taking chat requests, let running ones finish, then free the accelerator."""
    worker: Worker = request.app["worker"]
    if not worker.sleeping:
        worker.sleeping = True
        await asyncio.wrap_future(worker.engine.call(worker.engine.offload, when_idle=True))
        log.info("asleep: weights released from %s", worker.device)
    return web.json_response({"sleeping": True})


async def wake_up(request: web.Request) -> web.Response:
    worker: Worker = request.app["worker"]
    if worker.sleeping:
        await asyncio.wrap_future(worker.engine.call(worker.engine.reload))
        worker.sleeping = False
        log.info("awake on %s", worker.device)
    return web.json_response({"sleeping": False})


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Auth, then turn every refusal into an OpenAI-style error body; count chat outcomes."""
    worker: Worker = request.app["worker"]
    is_chat = request.path == "/v1/chat/completions"
    status = 200
    try:
        if worker.api_key and request.path not in OPEN_PATHS:
            if request.headers.get("Authorization", "") != f"Bearer {worker.api_key}":
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        response = await handler(request)
        status = response.status
        return response
    except APIError as exc:
        status = exc.status
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:  # aiohttp's own 404/405 for unknown routes
        status = exc.status
        err = APIError(exc.status, f"{exc.reason}: {request.method} {request.path}", code=exc.status)
        return web.json_response(err.body(), status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away
        raise
    except Exception as exc:
        status = 500
        log.exception("unhandled error on %s", request.path)
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
        return web.json_response(err.body(), status=500)
    finally:
        if is_chat:
            worker.metrics.request_done(status)


def build_app(worker: Worker) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024 * 1024)
    app["worker"] = worker
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    return app
