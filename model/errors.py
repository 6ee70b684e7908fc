"""API errors in the shape vLLM and OpenAI answer with: one exception type, one JSON body.

Every refusal the worker makes is an `APIError` carrying the HTTP status and
the fields OpenAI clients read. The body is vLLM's `ErrorResponse`
(vllm/entrypoints/openai/engine/protocol.py):

    {"error": {"message": str, "type": "BadRequestError", "param": str | None, "code": 400}}

`code` is the HTTP status as an integer and `type` the class-style name vLLM
uses (BadRequestError, NotFoundError, InternalServerError, ...), which is also
the exception class the `openai` package raises for that status.
"""

from __future__ import annotations

from typing import Optional

# vLLM's / openai-python's error type for each status the worker answers with.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """A request the worker refuses; `body()` is the vLLM/OpenAI error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "InternalServerError" if self.status >= 500 else "BadRequestError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)
