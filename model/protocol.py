"""The OpenAI chat-completions subset: validate requests, shape responses.

Pure functions, no torch and no HTTP: `parse_chat_request` turns a decoded
JSON body into a `ChatRequest` or raises `APIError(400)` naming the parameter;
the `*_object` helpers build the exact JSON objects OpenAI (and vLLM) return.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from model.errors import APIError, bad_request

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP_STRINGS = 16  # as OpenAI caps `stop` (4) but generous for vLLM users


@dataclass
class ChatRequest:
    messages: list[dict]
    model: Optional[str]
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    stream: bool = False
    ignore_eos: bool = False  # vLLM's extra parameter: generate max_tokens even past end-of-turn
    include_usage: bool = True  # the last chunk always carries usage (see server docs)


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{key}' must be a number, got {value!r}", key)
    return float(value)


def _text_of(content: Any, index: int) -> str:
    """Message content as text: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{index}].content must be a string, got {content!r}", "messages")


def parse_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        if "content" not in m or m["content"] is None:
            raise bad_request(f"messages[{i}] has no 'content'", "messages")
        out.append({"role": role, "content": _text_of(m["content"], i)})
    return out


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded /v1/chat/completions body (400 naming the bad parameter)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages = parse_messages(body.get("messages"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {model!r}", "model")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise bad_request(f"'max_tokens' must be a positive integer, got {max_tokens!r}", "max_tokens")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise bad_request(f"'temperature' must be 0 or more, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad_request(f"'top_p' must be in (0, 1], got {top_p}", "top_p")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' allows at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")

    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request(f"'seed' must be an integer, got {seed!r}", "seed")
    n = body.get("n", 1)
    if n != 1:
        raise bad_request(f"only n=1 is supported, got {n!r}", "n")

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request(f"'stream' must be true or false, got {stream!r}", "stream")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request(f"'ignore_eos' must be true or false, got {ignore_eos!r}", "ignore_eos")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    return ChatRequest(
        messages=messages,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=seed,
        stream=stream,
        ignore_eos=ignore_eos,
        include_usage=True,  # always: the bot logs token counts (stream_options honoured trivially)
    )


def check_context(prompt_tokens: int, max_tokens: Optional[int], max_context: int) -> int:
    """The completion budget for this prompt; 400 with the token counts if it cannot fit."""
    if max_tokens is None:
        if prompt_tokens >= max_context:
            raise bad_request(
                f"This model's maximum context length is {max_context} tokens; "
                f"the messages use {prompt_tokens} tokens, leaving no room for a reply.",
                "messages",
            )
        return max_context - prompt_tokens
    if prompt_tokens + max_tokens > max_context:
        raise bad_request(
            f"This model's maximum context length is {max_context} tokens; you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} "
            f"for the completion). Shorten the messages or lower max_tokens.",
            "max_tokens",
        )
    return max_tokens


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_object(cid: str, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
    }


def chunk_object(
    cid: str,
    model: str,
    created: int,
    delta: Optional[dict] = None,
    finish_reason: Optional[str] = None,
    usage: Optional[dict] = None,
) -> dict:
    """One `chat.completion.chunk`; a usage-only chunk has empty `choices` (as OpenAI)."""
    choices = [] if delta is None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    ]
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def model_list_object(base_id: str, base_root: str, adapters: dict[str, str], created: int) -> dict:
    """GET /v1/models: base first (parent None), then adapters (parent = base id), as vLLM."""
    data = [{"id": base_id, "object": "model", "created": created, "owned_by": "loopcord",
             "root": base_root, "parent": None}]
    for name, path in adapters.items():
        data.append({"id": name, "object": "model", "created": created, "owned_by": "loopcord",
                     "root": path, "parent": base_id})
    return {"object": "list", "data": data}
