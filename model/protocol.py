"""The API's one validation layer, and the response objects OpenAI and vLLM return.

Request bodies are pydantic models, as vLLM's are (vllm/entrypoints/openai/
protocol.py): a typed schema states every bound once, non-finite numbers
(`NaN`, `Infinity`, `1e400`) are refused by `allow_inf_nan=False`, the JSON
parser (pydantic-core's) refuses lone surrogates and nesting beyond its
recursion limit, and every failure becomes a 400 naming the parameter
(`parse_body`). Nothing invalid reaches tokenization or sampling.

Where vLLM has a rule, we follow it: `seed` within a signed 64-bit integer,
a positive temperature below 0.01 raised to 0.01 (vLLM's `_MAX_TEMP`, so
`1e-300` cannot overflow the softmax), `stream_options` only with `stream`.

The `*_object` helpers build the exact JSON objects OpenAI (and vLLM) return.
Pure functions, no torch and no HTTP.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from model.errors import APIError, bad_request

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP_STRINGS = 16  # OpenAI caps `stop` at 4; generous for vLLM users
MIN_TEMPERATURE = 1e-2  # vLLM's _MAX_TEMP: smaller positive temperatures are raised to this
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # torch.long, as vLLM bounds `seed`
MAX_ERROR_VALUE_CHARS = 40  # a refused value is quoted back only when short


def _utf8(text: str) -> str:
    """Text a tokenizer can encode: refuse lone surrogates (possible from a Python caller)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text contains an unpaired surrogate at position {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_utf8)]


class _Body(BaseModel):
    # strict: "5" is not 5 and "true" is not true; extra keys are ignored, as OpenAI's and vLLM's are.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[Text, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: Optional[bool] = True  # vLLM's default once stream_options is given
    continuous_usage_stats: Optional[bool] = False  # accepted; usage is sent once, at the end


UNSUPPORTED_PARAMETERS = ("logprobs", "top_logprobs", "tools", "tool_choice", "response_format")


class ChatCompletionBody(_Body):
    messages: list[Message] = Field(min_length=1)
    model: Optional[Text] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[NonEmptyText, Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_STRINGS)], None] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: Optional[int] = Field(1, ge=1, le=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False  # vLLM's extra parameter: generate max_tokens even past end-of-turn
    # OpenAI parameters that change what an answer is, which this worker does not do: a 400
    # saying so, never a 200 that silently ignored them (serve with vLLM for them).
    logprobs: Optional[Any] = None
    top_logprobs: Optional[Any] = None
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[Any] = None

    @field_validator(*UNSUPPORTED_PARAMETERS)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value in (None, False, "none", "auto") or (info.field_name == "response_format" and value == {"type": "text"}):
            return value
        raise PydanticCustomError("unsupported", "not supported by this worker (serve the model with vLLM for it)")



# An adapter's name is what requests put in `model`, what /v1/models lists and what logs show.
AdapterName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$"),
                        AfterValidator(_utf8)]


class LoadLoRABody(_Body):
    lora_name: AdapterName
    lora_path: NonEmptyText
    load_inplace: bool = False  # vLLM: replacing a loaded name must say so


class UnloadLoRABody(_Body):
    lora_name: NonEmptyText  # any loaded name may be unloaded


Body = TypeVar("Body", bound=_Body)


def _problem(exc: ValidationError) -> APIError:
    """The first validation error as a 400 naming its parameter (as vLLM's `param`)."""
    errors = exc.errors(include_url=False, include_input=True)
    # a union reports one error per member: the deepest one says what was actually wrong
    first = errors[0].get("loc", ())[:1]
    err = max((e for e in errors if e.get("loc", ())[:1] == first), key=lambda e: (len(e.get("loc", ())), e.get("type") != "string_type"))
    loc = [str(p) for p in err.get("loc", ())]
    msg = err.get("msg", "invalid value")
    if err.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}")
    if not loc:
        if err.get("type") in ("model_type", "model_attributes_type", "dict_type"):
            return bad_request("the request body must be a JSON object")
        return bad_request(msg.removeprefix("Value error, "))
    value = err.get("input")
    shown = ""
    if isinstance(value, (bool, int, float)):
        shown = f", got {value!r}"
    elif isinstance(value, str) and len(value) <= MAX_ERROR_VALUE_CHARS and value.isprintable():
        shown = f", got {value!r}"  # (a lone surrogate is not printable: never echoed into a UTF-8 body)
    # union members add their type name to the location ("stop.list[...]"); users never wrote those
    where = ".".join(p for p in loc if p.isdigit() or (p.isidentifier() and p != "str"))
    return bad_request(f"{where}: {msg.removeprefix('Value error, ')}{shown}", loc[0])


def parse_body(model: type[Body], body: Union[bytes, str, dict, Any]) -> Body:
    """Validate a request body (raw JSON or already decoded) against `model`; 400 otherwise."""
    try:
        if isinstance(body, (bytes, bytearray, str)):
            return model.model_validate_json(body)
        return model.model_validate(body)
    except ValidationError as exc:
        raise _problem(exc) from None


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request, normalised for the engine."""

    messages: list[dict]
    model: Optional[str]
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    stream: bool = False
    ignore_eos: bool = False
    include_usage: bool = True  # non-streamed answers always carry usage; streams only when asked


def parse_chat_request(body: Union[bytes, str, dict, Any]) -> ChatRequest:
    """Validate a /v1/chat/completions body (400 naming the bad parameter)."""
    req = parse_body(ChatCompletionBody, body)
    if req.stream_options is not None and req.stream_options.model_fields_set and not req.stream:
        # vLLM's rule and words; an empty object is let through, as vLLM does
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    temperature = 1.0 if req.temperature is None else req.temperature
    if 0 < temperature < MIN_TEMPERATURE:
        temperature = MIN_TEMPERATURE
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stream = bool(req.stream)
    return ChatRequest(
        messages=[{"role": m.role, "content": m.text()} for m in req.messages],
        model=req.model,
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=stop,
        seed=req.seed,
        stream=stream,
        ignore_eos=req.ignore_eos,
        include_usage=(not stream) or bool(req.stream_options and req.stream_options.include_usage),
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


def system_fingerprint(base: str, dtype: str, adapter: Optional[str]) -> str:
    """OpenAI's `system_fingerprint`: which weights answered. A digest of the base (its path and
    serving dtype) and of the adapter version the request held from admission to its last token
    (the sha256 of its files, `AdapterFiles.digest`): the same for the same files across restarts,
    different after a hot-swap to other files."""
    parts = [base, dtype] + ([adapter] if adapter is not None else [])
    return "fp_" + hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_object(cid: str, model: str, text: str, finish_reason: str, usage: dict,
                      stop_reason: Union[str, int, None] = None, fingerprint: Optional[str] = None) -> dict:
    """`stop_reason` is vLLM's extra: the stop string that ended the answer (None for EOS/length);
    `fingerprint` is OpenAI's `system_fingerprint` (the worker's: which weights answered)."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
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
    stop_reason: Union[str, int, None] = None,
    fingerprint: Optional[str] = None,
) -> dict:
    """One `chat.completion.chunk`; a usage-only chunk has empty `choices` (as OpenAI)."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": fingerprint, "choices": [] if delta is None else [choice]}
    if usage is not None:
        out["usage"] = usage
    return out


def model_list_object(base_id: str, base_root: Optional[str], adapters: dict[str, Optional[str]],
                      created: int, max_model_len: Optional[int] = None) -> dict:
    """GET /v1/models: base first (parent None), then adapters (parent = base id), as vLLM."""
    data = [{"id": base_id, "object": "model", "created": created, "owned_by": "loopcord",
             "root": base_root, "parent": None, "max_model_len": max_model_len}]
    for name, path in adapters.items():
        data.append({"id": name, "object": "model", "created": created, "owned_by": "loopcord",
                     "root": path, "parent": base_id})
    return {"object": "list", "data": data}
