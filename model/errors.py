"""OpenAI-style API errors: one exception type, one JSON body shape.

Every refusal the worker makes is an `APIError` carrying the HTTP status and
the fields OpenAI clients read (`message`, `type`, `param`, `code`), so the
`openai` package and our own client both surface the message to the user.
"""

from __future__ import annotations

from typing import Optional

# OpenAI's error `type` for each status the worker answers with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """A request the worker refuses; `body()` is the OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "api_error"),
                "param": self.param,
                "code": self.code if self.code is not None else self.status,
            }
        }


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else "bad_request")
