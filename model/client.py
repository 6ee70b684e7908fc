"""Async client for the model worker (or any vLLM/SGLang server): the bot's and trainer's seam.

It speaks the OpenAI chat-completions protocol (Server-Sent Events when
streaming) and the vLLM extras (/health, LoRA load/unload, sleep) over one
shared aiohttp session. The `openai` package did this job before; its HTTP
pool (httpx) scans every pooled connection whenever a stream closes, which
stalled the bot's event loop for hundreds of milliseconds with fifty
conversations open, and its per-chunk model objects cost more than the JSON
they wrap. The SSE reading here is a few lines (`sse_events`). Every failure
surfaces as one of four typed errors whose `.message` can be shown to a user
as is:

    ModelError          anything else (base class): 500s, an error event inside a stream
    ModelUnavailable    nothing listening, worker down / asleep / draining (502-504), timeouts, cut streams
    ModelOverloaded     429; `.retry_after` seconds when the server said
    ModelBadRequest     400/401/404/409/422: the request itself is wrong

Importing this module never imports torch.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Iterator, Optional

import aiohttp

DEFAULT_TIMEOUT_S = 120.0
READY_POLL_S = 0.25
# Connections kept to the model server. The bot's in-flight limit (discord.max_in_flight,
# else the worker's batch size) is what bounds concurrent answers; this only has to stay above it.
DEFAULT_MAX_CONNECTIONS = 256
SSE_DONE = "[DONE]"
EVENT_STREAM = "text/event-stream"


class ModelError(Exception):
    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.status = status


class ModelUnavailable(ModelError):
    pass


class ModelOverloaded(ModelError):
    def __init__(self, message: str, status: Optional[int] = 429, retry_after: Optional[float] = None):
        super().__init__(message, status)
        self.retry_after = retry_after


class ModelBadRequest(ModelError):
    pass


def _retry_after(headers) -> Optional[float]:
    try:
        return float(headers.get("Retry-After")) if headers and headers.get("Retry-After") else None
    except ValueError:
        return None


def error_for_status(status: int, message: str, headers=None) -> ModelError:
    """The typed error for an HTTP error status."""
    if status == 429:
        return ModelOverloaded(f"the model is busy: {message}", status, _retry_after(headers))
    if status in (502, 503, 504):
        return ModelUnavailable(f"the model is unavailable: {message}", status)
    if 400 <= status < 500:
        return ModelBadRequest(message, status)
    return ModelError(f"the model failed: {message}", status)


def _message_of(body: Any, fallback: str) -> str:
    """OpenAI error bodies: {"error": {"message": ...}} or the inner object itself."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(inner, str):
            return inner
    return fallback


def _error_from_body(status: int, text: str, reason: Optional[str], headers) -> ModelError:
    try:
        message = _message_of(json.loads(text), text)
    except ValueError:
        message = text
    return error_for_status(status, message.strip() or reason or f"HTTP {status}", headers)


# ---------------------------------------------------------------- Server-Sent Events


class SSEDecoder:
    """Bytes in, SSE events out (the WHATWG event-stream rules the OpenAI protocol uses).

    An event is its `data:` lines joined by newlines, dispatched at a blank line;
    `event:` names it; comments (`:` lines), `id:` and `retry:` are ignored.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event: Optional[str] = None

    def feed(self, chunk: bytes) -> Iterator[tuple[Optional[str], str]]:
        """Yield (event name, data) for every event completed by `chunk`."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:
                if self._data:
                    yield self._event, "\n".join(self._data)
                self._data, self._event = [], None
                continue
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "data":
                self._data.append(value)
            elif field == "event":
                self._event = value

    def close(self) -> Iterator[tuple[Optional[str], str]]:
        """A stream that ends without the final blank line still delivers its last event."""
        if self._buffer:
            yield from self.feed(b"\n")
        yield from self.feed(b"\n")


def _chunk_of(data: str) -> dict:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ModelError(f"the model server sent a malformed stream event: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise ModelError(f"the model server sent a stream event that is not an object: {data[:200]!r}")
    if "error" in chunk:  # an error inside a stream (the worker failing mid-answer)
        raise ModelError(f"the model failed: {_message_of(chunk, data)}")
    return chunk


def _deltas_of(chunk: dict) -> tuple[list[str], bool]:
    """The text deltas in one chat.completion.chunk and whether it finished a choice."""
    texts, finished = [], False
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content"):
            texts.append(delta["content"])
        if choice.get("finish_reason"):
            finished = True
    return texts, finished


# ---------------------------------------------------------------- the client


class ModelClient:
    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS):
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self.api_key = api_key
        self.timeout = timeout
        self.max_connections = max_connections
        # A stream may run for minutes; what must not happen is silence, so streams time out on
        # connect and between reads, other requests on the whole exchange.
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        self._session: Optional[aiohttp.ClientSession] = None

    @classmethod
    def from_config(cls, cfg) -> "ModelClient":
        from model.config import SERVE_PORT, secret

        url = cfg.model.url or f"http://{cfg.worker.host}:{cfg.worker.port or SERVE_PORT}"
        return cls(url, api_key=secret(cfg.model.api_key_env), timeout=cfg.model.request_timeout_s)

    def _http(self) -> aiohttp.ClientSession:
        """The one session (and connection pool); made lazily, inside the running loop."""
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections)
            self._session = aiohttp.ClientSession(headers=headers, connector=connector,
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    def _unreachable(self, exc: BaseException, what: str) -> ModelUnavailable:
        if isinstance(exc, asyncio.TimeoutError):
            return ModelUnavailable(f"the model worker did not answer {what} in time")
        if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            return ModelUnavailable(f"the connection to the model worker broke during {what}: {exc}")
        return ModelUnavailable(f"cannot reach the model worker at {self.base_url}: {exc}")

    # ---------------- chat ----------------

    @staticmethod
    def _body(messages, model, stream, max_tokens, temperature, top_p, stop, seed, extra_body) -> dict:
        given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        body = {"model": model, "messages": messages, **{k: v for k, v in given.items() if v is not None}}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        body.update(extra_body or {})  # server-specific fields sit at the top level, as in `openai`
        return body

    async def stream_chat(self, messages: list[dict], *, model: str, max_tokens=None, temperature=None,
                          top_p=None, stop=None, seed=None, extra_body: Optional[dict] = None) -> AsyncIterator[str]:
        """Yield text deltas; raises a typed error (never hangs) if the stream breaks.

        `extra_body` carries server-specific parameters (vLLM's `ignore_eos`, ...).
        """
        body = self._body(messages, model, True, max_tokens, temperature, top_p, stop, seed, extra_body)
        what = "the chat request"
        finished = False
        try:
            async with self._http().post(f"{self.base_url}/v1/chat/completions", json=body,
                                         timeout=self._stream_timeout) as resp:
                if resp.status >= 400:
                    raise _error_from_body(resp.status, await resp.text(), resp.reason, resp.headers)
                if resp.content_type != EVENT_STREAM:  # a server that ignored `stream`: one whole answer
                    texts, finished = _deltas_of(_message_as_chunk(await resp.json(content_type=None)))
                    for text in texts:
                        yield text
                else:
                    decoder = SSEDecoder()
                    async for raw in resp.content.iter_any():
                        for _, data in decoder.feed(raw):
                            if data.strip() == SSE_DONE:
                                continue  # read on to the end so the connection can be reused
                            texts, done = _deltas_of(_chunk_of(data))
                            finished = finished or done
                            for text in texts:
                                yield text
                    for _, data in decoder.close():
                        if data.strip() != SSE_DONE:
                            texts, done = _deltas_of(_chunk_of(data))
                            finished = finished or done
                            for text in texts:
                                yield text
        except ModelError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc, what) from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"the model server sent an answer this client cannot read: {exc}") from exc
        if not finished:
            raise ModelUnavailable("the model's answer was cut off (the stream ended early)")

    async def chat(self, messages: list[dict], *, model: str, max_tokens=None, temperature=None, top_p=None,
                   stop=None, seed=None, extra_body: Optional[dict] = None) -> str:
        body = self._body(messages, model, False, max_tokens, temperature, top_p, stop, seed, extra_body)
        resp = await self._request("POST", "/v1/chat/completions", body)
        try:
            return resp["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ModelError(f"the model server's answer has no choices[0].message.content: {str(resp)[:200]}") \
                from None

    # ---------------- the vLLM extras ----------------

    async def _request(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        try:
            async with self._http().request(method, f"{self.base_url}{path}", json=body) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _error_from_body(resp.status, text, resp.reason, resp.headers)
                if resp.content_type == "application/json":
                    try:
                        return json.loads(text)
                    except ValueError:
                        raise ModelError(f"the model server sent invalid JSON for {method} {path}: "
                                         f"{text[:200]!r}") from None
                return text
        except ModelError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc, f"{method} {path}") from None

    async def health(self) -> dict:
        """The server's /health as a dict: loopcord's worker reports its state there; vLLM's
        answers an empty 200, read as {} (the server is up and says nothing more)."""
        body = await self._request("GET", "/health")
        if isinstance(body, str):
            try:
                body = json.loads(body) if body.strip() else {}
            except ValueError:
                body = {}
        return body if isinstance(body, dict) else {}

    async def models(self) -> list[dict]:
        body = await self._request("GET", "/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise ModelError(f"the model server's /v1/models has no 'data' list: {str(body)[:200]}")
        return [m for m in data if isinstance(m, dict)]

    async def base_model_id(self) -> str:
        """The id of the model that is not an adapter (vLLM and loopcord: `parent` null)."""
        for entry in await self.models():
            if entry.get("parent") is None and isinstance(entry.get("id"), str):
                return entry["id"]
        raise ModelError("the model server lists no base model")

    async def load_adapter(self, name: str, path: str) -> None:
        """Load or hot-swap `name` (returns once new requests use it)."""
        await self._request("POST", "/v1/load_lora_adapter",
                            {"lora_name": name, "lora_path": str(path), "load_inplace": True})

    async def unload_adapter(self, name: str) -> None:
        await self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})

    async def sleep(self) -> None:
        await self._request("POST", "/sleep")

    async def wake_up(self) -> None:
        await self._request("POST", "/wake_up")

    async def wait_ready(self, timeout: float) -> dict:
        """Poll /health until the worker answers; ModelUnavailable after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: Optional[ModelError] = None
        while time.monotonic() < deadline:
            try:
                return await self.health()
            except ModelError as exc:
                last = exc
            await asyncio.sleep(READY_POLL_S)
        raise ModelUnavailable(f"the model worker at {self.base_url} was not ready after {timeout:.0f}s"
                               + (f" ({last.message})" if last else ""))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _message_as_chunk(completion: Any) -> dict:
    """A non-streamed chat.completion read as one chunk (its message as the delta)."""
    if not isinstance(completion, dict):
        raise ModelError(f"the model server's answer is not a chat completion: {str(completion)[:200]}")
    if "error" in completion:
        raise ModelError(f"the model failed: {_message_of(completion, str(completion))}")
    choices = [{"delta": c.get("message") or {}, "finish_reason": c.get("finish_reason")}
               for c in completion.get("choices") or ()]
    return {"choices": choices}
