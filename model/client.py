"""Async client for the model worker (or any vLLM/SGLang server): the bot's and trainer's seam.

Chat goes through the `openai` package (the protocol, not our own SSE parser);
the vLLM extras (/health, LoRA load/unload, sleep) through aiohttp. Every
failure surfaces as one of four typed errors whose `.message` can be shown to a
user as is:

    ModelError          anything else (base class)
    ModelUnavailable    nothing listening, worker down / asleep / draining (503), timeouts, cut streams
    ModelOverloaded     429; `.retry_after` seconds when the server said
    ModelBadRequest     400/401/404/409: the request itself is wrong

Importing this module never imports torch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Optional

import aiohttp
import openai

DEFAULT_TIMEOUT_S = 120.0
READY_POLL_S = 0.25


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


def _from_openai(exc: Exception) -> ModelError:
    if isinstance(exc, openai.APIStatusError):
        return error_for_status(exc.status_code, _message_of(exc.body, exc.message), exc.response.headers)
    if isinstance(exc, openai.APITimeoutError):
        return ModelUnavailable("the model did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return ModelUnavailable(f"cannot reach the model worker: {exc}")
    if isinstance(exc, openai.APIError):  # an error event inside a stream
        return ModelError(f"the model failed: {_message_of(exc.body, exc.message)}")
    # Anything else is the transport failing under us (the openai package's HTTP
    # library differs across versions, so its exception types are not named here).
    return ModelUnavailable(f"the connection to the model worker broke: {type(exc).__name__}: {exc}")


class ModelClient:
    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_S):
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self.api_key = api_key
        self.timeout = timeout
        # max_retries=0: a 429 or 503 must reach the caller, who decides (and tells the user).
        self._openai = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key or "EMPTY",
                                          timeout=timeout, max_retries=0)
        self._session: Optional[aiohttp.ClientSession] = None

    @classmethod
    def from_config(cls, cfg) -> "ModelClient":
        from model.config import secret

        url = cfg.model.url or f"http://{cfg.worker.host}:{cfg.worker.port}"
        return cls(url, api_key=secret(cfg.model.api_key_env), timeout=cfg.model.request_timeout_s)

    # ---------------- chat ----------------

    @staticmethod
    def _params(max_tokens, temperature, top_p, stop, seed, extra_body) -> dict:
        given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed,
                     extra_body=extra_body)
        return {k: v for k, v in given.items() if v is not None}

    async def stream_chat(self, messages: list[dict], *, model: str, max_tokens=None, temperature=None,
                          top_p=None, stop=None, seed=None, extra_body: Optional[dict] = None) -> AsyncIterator[str]:
        """Yield text deltas; raises a typed error (never hangs) if the stream breaks.

        `extra_body` carries server-specific parameters (vLLM's `ignore_eos`, ...).
        """
        try:
            stream = await self._openai.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True},
                **self._params(max_tokens, temperature, top_p, stop, seed, extra_body))
        except Exception as exc:
            raise _from_openai(exc) from exc
        finished = False
        try:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        yield choice.delta.content
                    if choice.finish_reason:
                        finished = True
        except ModelError:
            raise
        except Exception as exc:
            raise _from_openai(exc) from exc
        finally:
            await stream.close()
        if not finished:
            raise ModelUnavailable("the model's answer was cut off (the stream ended early)")

    async def chat(self, messages: list[dict], *, model: str, max_tokens=None, temperature=None, top_p=None,
                   stop=None, seed=None, extra_body: Optional[dict] = None) -> str:
        try:
            resp = await self._openai.chat.completions.create(
                model=model, messages=messages, **self._params(max_tokens, temperature, top_p, stop, seed, extra_body))
        except Exception as exc:
            raise _from_openai(exc) from exc
        return resp.choices[0].message.content or ""

    # ---------------- the vLLM extras ----------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _request(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        try:
            async with self._http().request(method, f"{self.base_url}{path}", json=body) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    try:
                        import json

                        message = _message_of(json.loads(text), text)
                    except ValueError:
                        message = text or resp.reason or f"HTTP {resp.status}"
                    raise error_for_status(resp.status, message, resp.headers)
                if resp.content_type == "application/json":
                    return await resp.json()
                return text
        except ModelError:
            raise
        except asyncio.TimeoutError:
            raise ModelUnavailable(f"the model worker did not answer {method} {path} in time") from None
        except aiohttp.ClientError as exc:
            raise ModelUnavailable(f"cannot reach the model worker at {self.base_url}: {exc}") from None

    async def health(self) -> dict:
        return await self._request("GET", "/health")

    async def models(self) -> list[dict]:
        return (await self._request("GET", "/v1/models"))["data"]

    async def base_model_id(self) -> str:
        for entry in await self.models():
            if entry.get("parent") is None:
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
        await self._openai.close()
