"""Errors the picker answers with, as the endpoint-picker protocol wants them."""

from __future__ import annotations

# A message quotes what the client sent (a model name, a path): a 5 MB model name came back
# whole in the answer and in the picker's log line, for every such request. Longer messages
# keep their start and end (what was wrong, and where) and say how much was left out.
MAX_MESSAGE_CHARS = 1024
_KEEP_END = 256


def bounded(message: str) -> str:
    """`message`, cut in the middle to at most about MAX_MESSAGE_CHARS characters."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    head = MAX_MESSAGE_CHARS - _KEEP_END
    left_out = len(message) - MAX_MESSAGE_CHARS
    return f"{message[:head]}…[{left_out} characters left out]…{message[-_KEEP_END:]}"


class PickerError(Exception):
    """A request the picker cannot route: becomes an ImmediateResponse with this status.

    The body is OpenAI-style JSON so clients' SDKs show the message.
    """

    KINDS = {
        400: "BadRequest",
        404: "NotFound",
        408: "RequestTimeout",
        413: "RequestEntityTooLarge",
        422: "UnprocessableEntity",
        429: "TooManyRequests",
        500: "Internal",
        503: "ServiceUnavailable",
    }

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        message = bounded(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or self.KINDS.get(status, "Error")
        self.headers = headers or {}  # e.g. Retry-After on a 429
        self.param = param  # the request field at fault, when one is

    def body(self) -> dict:
        return {
            "error": {
                "message": f"inference error: {self.code} - {self.message}",
                "type": self.code,
                "param": self.param,
                "code": self.status,
            }
        }


class ModelNotFound(PickerError):
    """No model of that name is served here: OpenAI's answer for an unknown model (the
    body-based router's for a name no pool serves, the picker's for GET /v1/models/{id})."""

    def __init__(self, model: str) -> None:
        super().__init__(
            404,
            f"The model {model!r} does not exist or is not served by this gateway",
            param="model",
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        }


class NoCapacity(PickerError):
    """No ready endpoint can take the request now (its pool or ModelServer has none, as after
    a scale to zero): the director holds it for a pod to come (epp.capacity_wait) rather
    than answer at once."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message)


class ResponseNotFound(PickerError):
    """A stored response the gateway cannot reach: vLLM's answer for an unknown response id
    (404, OpenAI's `invalid_request_error`), with why — the pod that stored it is gone, or
    the id is not one this pool made."""

    def __init__(self, response_id: str, why: str, param: str | None = None) -> None:
        super().__init__(404, f"Response with id {response_id!r} not found: {why}", param=param)

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": "response_not_found",
            }
        }
